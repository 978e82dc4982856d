"""Export: torchvision names and layouts, checked by an independent NumPy forward pass."""

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from configs import tiny
from moco_jax.evaluation import export
from moco_jax import models
from moco_jax.weights import torchvision_names


# --------------------------------------------------------------------------
# A torchvision ResNet forward pass in NumPy, reading only the exported dict.


def _conv(x, w, stride, padding):
  """torch.nn.functional.conv2d(x, w, stride=stride, padding=padding), NCHW / OIHW."""
  x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
  windows = sliding_window_view(x, w.shape[2:], axis=(2, 3))[:, :, ::stride, ::stride]
  return np.einsum('nchwij,ocij->nohw', windows, w, optimize=True)


def _bn(x, state, name, eps=1e-5):
  scale = state[f'{name}.weight'] / np.sqrt(state[f'{name}.running_var'] + eps)
  shift = state[f'{name}.bias'] - state[f'{name}.running_mean'] * scale
  return x * scale[None, :, None, None] + shift[None, :, None, None]


def _maxpool(x):
  """nn.MaxPool2d(3, 2, 1)."""
  x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
  return sliding_window_view(x, (3, 3), axis=(2, 3))[:, :, ::2, ::2].max(axis=(-1, -2))


def _relu(x):
  return np.maximum(x, 0)


def torchvision_resnet_features(state, images_nhwc, stem):
  """Pooled features of torchvision's ResNet (fc removed) with weights `state`."""
  x = np.transpose(images_nhwc, (0, 3, 1, 2)).astype(np.float64)
  w = state['conv1.weight']
  x = _conv(x, w, 2 if stem == 'imagenet' else 1, w.shape[-1] // 2)
  x = _relu(_bn(x, state, 'bn1'))
  if stem == 'imagenet':
    x = _maxpool(x)
  stage = 1
  while f'layer{stage}.0.conv1.weight' in state:
    block = 0
    while f'layer{stage}.{block}.conv1.weight' in state:
      p = f'layer{stage}.{block}'
      stride = 2 if stage > 1 and block == 0 else 1
      bottleneck = f'{p}.conv3.weight' in state
      if bottleneck:  # torchvision v1.5: the stride is on the 3x3 conv.
        y = _relu(_bn(_conv(x, state[f'{p}.conv1.weight'], 1, 0), state, f'{p}.bn1'))
        y = _relu(_bn(_conv(y, state[f'{p}.conv2.weight'], stride, 1), state, f'{p}.bn2'))
        y = _bn(_conv(y, state[f'{p}.conv3.weight'], 1, 0), state, f'{p}.bn3')
      else:
        y = _relu(_bn(_conv(x, state[f'{p}.conv1.weight'], stride, 1), state, f'{p}.bn1'))
        y = _bn(_conv(y, state[f'{p}.conv2.weight'], 1, 1), state, f'{p}.bn2')
      if f'{p}.downsample.0.weight' in state:
        x = _bn(_conv(x, state[f'{p}.downsample.0.weight'], stride, 0), state,
                f'{p}.downsample.1')
      x = _relu(x + y)
      block += 1
    stage += 1
  return x.mean(axis=(2, 3))


# --------------------------------------------------------------------------
# Flax side.


def _random_backbone(backbone, image_size, seed=0):
  """Variables with non-trivial BN statistics and affine terms, so a wrong BN mapping shows."""
  rng = jax.random.PRNGKey(seed)
  variables = backbone.init(rng, jnp.zeros((1, image_size, image_size, 3)), train=False)

  def perturb(tree, key, make):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.device_get(jax.tree.unflatten(treedef, [make(k, x) for k, x in zip(keys, leaves)]))

  def stat(key, x):  # 'mean' and 'var' leaves alternate; both get positive-ish noise.
    return jax.random.uniform(key, x.shape, minval=0.5, maxval=1.5)

  def affine(key, x):  # BN scale/bias (1-D) around their init; kernels as initialised.
    return x + 0.2 * jax.random.normal(key, x.shape) if x.ndim == 1 else x

  batch_stats = perturb(variables['batch_stats'], jax.random.PRNGKey(seed + 1), stat)
  # Running means small, so ReLUs stay half open and features are not all zero.
  batch_stats = jax.tree_util.tree_map_with_path(
      lambda path, x: 0.1 * (x - 1.0) if path[-1].key == 'mean' else x, batch_stats)
  params = perturb(variables['params'], jax.random.PRNGKey(seed + 2), affine)
  return params, batch_stats


def _compare(backbone, image_size, stem):
  params, batch_stats = _random_backbone(backbone, image_size)
  images = np.random.default_rng(0).normal(size=(2, image_size, image_size, 3)).astype(np.float32)
  flax_features = np.asarray(backbone.apply({'params': params, 'batch_stats': batch_stats},
                                            images, train=False))
  state = torchvision_names.torchvision_state_dict(params, batch_stats)
  reference = torchvision_resnet_features(state, images, stem)
  assert np.abs(reference).mean() > 1e-2, 'degenerate test: features are (nearly) all zero'
  np.testing.assert_allclose(flax_features, reference, rtol=1e-4, atol=1e-4)


def _tiny_backbone(stem, block_cls=models.BasicBlock, stages=(1, 1, 1, 1), width=8):
  return models.ResNet(stage_sizes=stages, block_cls=block_cls, width=width, stem=stem)


# Even and odd sizes: a stride-2 3x3 convolution pads (1, 1) in torchvision
# whatever the size; Flax's 'SAME' would pad (0, 1) on even sizes.
@pytest.mark.parametrize('stem,block_cls,stages,size', [
    ('cifar', models.BasicBlock, (1, 1, 1, 1), 32),
    ('cifar', models.BasicBlock, (1, 1, 1, 1), 33),
    ('imagenet', models.BasicBlock, (2, 1, 1), 32),
    ('imagenet', models.Bottleneck, (1, 2), 32),
])
def test_exported_weights_give_the_same_features_in_a_torchvision_forward(stem, block_cls, stages,
                                                                         size):
  _compare(_tiny_backbone(stem, block_cls, stages), size, stem)


def test_resnet18_keys_and_shapes_are_torchvision_s():
  config = tiny.get_config()
  config.model.name, config.model.width, config.model.stem = 'resnet18', 4, 'imagenet'
  encoder = models.create_encoder(config.model)
  variables = jax.eval_shape(lambda: encoder.init(jax.random.PRNGKey(0),
                                                  jnp.zeros((1, 32, 32, 3)), train=False))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables)
  state = torchvision_names.torchvision_state_dict(zeros['params']['backbone'],
                                        zeros['batch_stats']['backbone'])
  expected = {'conv1.weight'} | {f'bn1.{b}' for b in _BN}
  for stage in range(1, 5):
    for block in range(2):
      p = f'layer{stage}.{block}'
      expected |= {f'{p}.conv1.weight', f'{p}.conv2.weight'}
      expected |= {f'{p}.{bn}.{b}' for bn in ('bn1', 'bn2') for b in _BN}
    if stage > 1:
      expected |= {f'layer{stage}.0.downsample.0.weight'}
      expected |= {f'layer{stage}.0.downsample.1.{b}' for b in _BN}
  assert set(state) == expected
  assert state['conv1.weight'].shape == (4, 3, 7, 7)  # OIHW.
  assert state['layer2.0.conv1.weight'].shape == (8, 4, 3, 3)
  assert state['layer2.0.downsample.0.weight'].shape == (8, 4, 1, 1)
  assert state['layer4.1.bn2.running_var'].shape == (32,)
  assert state['bn1.num_batches_tracked'].dtype == np.int64


_BN = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')


def test_backbone_from_torchvision_inverts_the_export():
  backbone = _tiny_backbone('imagenet', models.BasicBlock, (2, 1, 1))
  params, batch_stats = _random_backbone(backbone, 32)
  state = torchvision_names.torchvision_state_dict(params, batch_stats)
  template = jax.eval_shape(lambda: backbone.init(jax.random.PRNGKey(1),
                                                  jnp.zeros((1, 32, 32, 3)), train=False))
  back = torchvision_names.backbone_from_torchvision(state, template['params'], template['batch_stats'])
  for ours, original in zip(jax.tree.leaves(back), jax.tree.leaves((params, batch_stats))):
    np.testing.assert_array_equal(ours, original)
  assert jax.tree.structure(back) == jax.tree.structure((params, batch_stats))
  state['layer1.0.conv1.weight'] = state['layer1.0.conv1.weight'][:, :4]
  with pytest.raises(ValueError, match='layer1.0.conv1'):
    torchvision_names.backbone_from_torchvision(state, template['params'], template['batch_stats'])


def test_export_backbone_writes_npz_and_sidecar_from_a_train_state(tmp_path):
  config = tiny.get_config()
  encoder = models.create_encoder(config.model)
  variables = encoder.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)

  class FakeState:  # Anything with params / batch_stats, like TrainState.
    params = variables['params']
    batch_stats = variables['batch_stats']

  path = os.path.join(tmp_path, 'out', 'backbone_torchvision.npz')
  state = export.export_backbone(FakeState(), None, path, config.model)
  loaded = dict(np.load(path))
  assert set(loaded) == set(state) and not any(k.startswith(('fc', 'head')) for k in loaded)
  np.testing.assert_array_equal(
      loaded['conv1.weight'],
      np.transpose(variables['params']['backbone']['conv1']['kernel'], (3, 2, 0, 1)))
  with open(os.path.join(tmp_path, 'out', 'backbone_torchvision.json')) as f:
    sidecar = json.load(f)
  assert sidecar['model']['width'] == config.model.width
  with open(path, 'rb') as f:  # The sidecar names the export's content.
    assert sidecar['sha256'] == hashlib.sha256(f.read()).hexdigest()


def test_loads_into_torchvision_and_gives_the_same_features():
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  config = tiny.get_config()
  config.model.name, config.model.width, config.model.stem = 'resnet18', 64, 'imagenet'
  backbone = models.create_backbone(config.model)
  params, batch_stats = _random_backbone(backbone, 33)
  state = torchvision_names.torchvision_state_dict(params, batch_stats)
  model = torchvision.models.resnet18()
  model.fc = torch.nn.Identity()
  model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
  model.eval()
  images = np.random.default_rng(0).normal(size=(2, 33, 33, 3)).astype(np.float32)
  with torch.no_grad():
    theirs = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  ours = np.asarray(backbone.apply({'params': params, 'batch_stats': batch_stats}, images,
                                   train=False))
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
