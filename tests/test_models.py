"""Encoders: torchvision-sized ResNets, heads, and the three BatchNorm modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import default
from moco_jax import models
from moco_jax.core import parallel


def _model_config(name, stem='imagenet', head='mlp'):
  config = default.get_config().model
  config.name, config.stem, config.head = name, stem, head
  return config


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('name,backbone_params,width', [
    # torchvision's resnet18 / resnet50 without their 1000-way fc layer.
    ('resnet18', 11_176_512, 512),
    ('resnet50', 23_508_032, 2048),
])
def test_backbones_match_torchvision_sizes(name, backbone_params, width):
  encoder = models.create_encoder(_model_config(name))
  shapes = jax.eval_shape(lambda: encoder.init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, 224, 224, 3)), train=False))
  params = shapes['params']
  assert _count(params['backbone']) == backbone_params
  # v2 head: Linear(width, width) -> ReLU -> Linear(width, 128).
  assert params['head']['fc1']['kernel'].shape == (width, width)
  assert params['head']['fc2']['kernel'].shape == (width, 128)
  assert encoder.backbone.num_features == width


def test_v1_linear_head_and_features_only():
  encoder = models.create_encoder(_model_config('resnet_tiny', 'cifar', 'linear'))
  x = jnp.ones((2, 32, 32, 3))
  variables = encoder.init(jax.random.PRNGKey(0), x, train=False)
  assert set(variables['params']['head']) == {'fc'}
  embedding = encoder.apply(variables, x, train=False)
  features = encoder.apply(variables, x, train=False, features_only=True)
  assert embedding.shape == (2, 128) and embedding.dtype == jnp.float32
  assert features.shape == (2, 512)


def test_head_dims_build_a_deeper_mlp_and_the_default_keeps_fc1_fc2():
  x = jnp.ones((2, 32, 32, 3))
  default_head = models.create_encoder(_model_config('resnet_tiny', 'cifar'))
  params = default_head.init(jax.random.PRNGKey(0), x, train=False)['params']['head']
  assert {k: v['kernel'].shape for k, v in params.items()} == {'fc1': (512, 512),
                                                               'fc2': (512, 128)}
  config = _model_config('resnet_tiny', 'cifar')
  config.head_dims, config.embed_dim = (100, 50, 25), 25  # The write-up's 512-100-50-25.
  encoder = models.create_encoder(config)
  variables = encoder.init(jax.random.PRNGKey(0), x, train=False)
  assert {k: v['kernel'].shape for k, v in variables['params']['head'].items()} == {
      'fc1': (512, 100), 'fc2': (100, 50), 'fc3': (50, 25)}
  assert encoder.apply(variables, x, train=False).shape == (2, 25)


def test_cifar_stem_keeps_resolution_longer():
  x = jnp.ones((1, 32, 32, 3))
  for stem, first_stage_side in (('cifar', 32), ('imagenet', 8)):
    backbone = models.create_backbone(_model_config('resnet_tiny', stem))
    variables = backbone.init(jax.random.PRNGKey(0), x, train=False)
    _, inter = backbone.apply(variables, x, train=False, capture_intermediates=True)
    layer1 = inter['intermediates']['layer1_0']['__call__'][0]
    assert layer1.shape[1] == first_stage_side, stem


def _reference_bn(x, groups, eps=1e-5):
  """Each group normalised with its own biased statistics, in NumPy."""
  out = []
  for g in np.split(np.asarray(x, np.float64), groups):
    mean = g.mean(axis=(0, 1, 2))
    var = g.var(axis=(0, 1, 2))
    out.append((g - mean) / np.sqrt(var + eps))
  return np.concatenate(out)


@pytest.mark.parametrize('groups', [1, 4])
def test_split_batchnorm_normalises_each_group_on_its_own(groups):
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 3, 3, 5)) * 3 + 1
  bn = models.BatchNorm(num_splits=groups)
  variables = bn.init(jax.random.PRNGKey(1), x)
  y, updates = bn.apply(variables, x, mutable=['batch_stats'])
  np.testing.assert_allclose(y, _reference_bn(x, groups), rtol=1e-4, atol=1e-4)
  # Running stats move 10% towards the mean over groups of the group statistics;
  # the variance is each group's unbiased one (torch: n / (n - 1), here n = 2*3*3).
  parts = np.split(np.asarray(x, np.float64), groups)
  group_means = np.stack([g.mean(axis=(0, 1, 2)) for g in parts])
  group_vars = np.stack([g.var(axis=(0, 1, 2), ddof=1) for g in parts])
  np.testing.assert_allclose(updates['batch_stats']['mean'], 0.1 * group_means.mean(0),
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(updates['batch_stats']['var'], 0.9 + 0.1 * group_vars.mean(0),
                             rtol=1e-5)


def test_sync_batchnorm_uses_global_statistics():
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 2, 2, 3)) * 2 - 1
  bn = models.BatchNorm(axis_name=parallel.AXIS)
  variables = models.BatchNorm().init(jax.random.PRNGKey(1), x)
  mesh = parallel.make_mesh(jax.devices())
  fn = jax.shard_map(lambda v: bn.apply(variables, v, mutable=['batch_stats']), mesh=mesh,
                     in_specs=P(parallel.AXIS), out_specs=(P(parallel.AXIS), P()),
                     check_vma=False)
  y, updates = jax.jit(fn)(x)
  np.testing.assert_allclose(y, _reference_bn(x, 1), rtol=1e-4, atol=1e-4)
  # The running variance is unbiased over the global batch (torch's SyncBatchNorm).
  global_var = np.asarray(x, np.float64).var(axis=(0, 1, 2), ddof=1)
  np.testing.assert_allclose(updates['batch_stats']['var'], 0.9 + 0.1 * global_var, rtol=1e-5)
  # Per-device (local) statistics give a different answer on the same data.
  local = jax.shard_map(lambda v: models.BatchNorm().apply(variables, v, mutable=['batch_stats'])[0],
                        mesh=mesh, in_specs=P(parallel.AXIS), out_specs=P(parallel.AXIS),
                        check_vma=False)
  assert np.abs(np.asarray(jax.jit(local)(x)) - _reference_bn(x, 1)).max() > 1e-2


def test_inference_mode_uses_running_statistics():
  x = jnp.arange(24.0).reshape(4, 1, 2, 3)
  bn = models.BatchNorm(use_running_average=True)
  variables = bn.init(jax.random.PRNGKey(0), x)
  variables = {'params': variables['params'],
               'batch_stats': {'mean': jnp.full(3, 2.0), 'var': jnp.full(3, 4.0)}}
  np.testing.assert_allclose(bn.apply(variables, x), (x - 2.0) / np.sqrt(4.0 + 1e-5), rtol=1e-6)
