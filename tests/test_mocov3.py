"""MoCo v3 (`config.method=mocov3`) and the ViT backbone against the official moco-v3 code.

tests/data/official_mocov3_step.npz is written by tools/make_mocov3_goldens.py
from moco-v3's builder.py, optimizer.py (LARS) and vits.py (two steps of a
tiny ResNet with LARS and a tiny ViT with AdamW, same weights and views);
these tests read it with NumPy.
"""

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import helpers
from configs import default
import rounding
from configs import tiny
from moco_jax.core import parallel
from moco_jax.evaluation import frozen
from moco_jax.methods import base
from moco_jax.methods import mocov3
from moco_jax import models
from moco_jax.models import describe
from moco_jax import pretrain
from moco_jax.training import optim
from moco_jax.training import state as state_lib
from moco_jax.training import step as step_lib
from moco_jax.weights import torchvision_names

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data',
                      'official_mocov3_step.npz')
AXIS = parallel.AXIS


def _golden(case: str) -> dict:
  with np.load(GOLDEN) as data:
    return {k.split('/', 1)[1]: data[k] for k in data.files if k.startswith(case + '/')}


# --------------------------------------------------------------------------
# Our trees <-> the official state_dict names.

_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
         'var': 'running_var'}
_VIT_MODULES = {'qkv': 'attn.qkv', 'proj': 'attn.proj', 'fc1': 'mlp.fc1', 'fc2': 'mlp.fc2',
                'norm1': 'norm1', 'norm2': 'norm2'}


def _torch_name(path: tuple, encoder: str, head: str) -> str:
  """Official name of one of our leaves (backbone/head/predictor of a v3 encoder).

  Args:
    path: our leaf's path, e.g. ('head', 'fc1', 'kernel').
    encoder: 'base_encoder' or 'momentum_encoder'.
    head: the projector's name in the official model ('fc' ResNet, 'head' ViT).
  """
  section, rest = path[0], path[1:]
  if section in ('head', 'predictor'):
    module, leaf = rest
    index = 3 * (int(module[2:]) - 1) + (1 if module.startswith('bn') else 0)
    prefix = f'{encoder}.{head}' if section == 'head' else 'predictor'
    return f'{prefix}.{index}.{_LEAF[leaf]}'
  # The ViT backbone (the ResNet backbone goes through export's torchvision names).
  if rest[0] in ('patch_kernel', 'patch_bias'):
    return f'{encoder}.patch_embed.proj.{"weight" if rest[0] == "patch_kernel" else "bias"}'
  if rest[0] == 'cls_token':
    return f'{encoder}.cls_token'
  if rest[0] == 'norm':
    return f'{encoder}.norm.{_LEAF[rest[1]]}'
  block, module, leaf = rest
  return f'{encoder}.blocks.{int(block[5:])}.{_VIT_MODULES[module]}.{_LEAF[leaf]}'


def _to_torch_layout(path: tuple, value) -> np.ndarray:
  value = np.asarray(value, np.float32)
  if path[-1] == 'patch_kernel':
    return value.transpose(3, 2, 0, 1)  # HWIO -> OIHW.
  if path[-1] == 'kernel':
    return value.T  # Dense [in, out] -> Linear [out, in].
  return value


def _from_torch_layout(path: tuple, value) -> np.ndarray:
  if path[-1] == 'patch_kernel':
    return np.asarray(value).transpose(2, 3, 1, 0)
  if path[-1] == 'kernel':
    return np.asarray(value).T
  return np.asarray(value)


def _is_resnet_backbone(path, vit: bool) -> bool:
  return path[0] == 'backbone' and not vit


def to_torch(params, batch_stats, encoder: str, vit: bool) -> dict:
  """{official name: float32 array} of our (params, batch_stats) of one encoder."""
  params, batch_stats = jax.device_get((params, batch_stats))
  head = 'head' if vit else 'fc'
  out = {}
  if not vit:
    for name, value in torchvision_names.torchvision_state_dict(params['backbone'],
                                                     batch_stats['backbone']).items():
      if not name.endswith('num_batches_tracked'):
        out[f'{encoder}.{name}'] = np.asarray(value, np.float32)
  for tree in (params, batch_stats):
    for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
      path = tuple(k.key for k in path)
      if not _is_resnet_backbone(path, vit):
        out[_torch_name(path, encoder, head)] = _to_torch_layout(path, value)
  return out


def from_torch(state: dict, template_params, template_stats, vit: bool):
  """Our (params, batch_stats) of the base encoder + predictor holding `state`'s values."""
  head = 'head' if vit else 'fc'
  def fill(tree):
    return jax.tree_util.tree_map_with_path(
        lambda p, _: jnp.asarray(_from_torch_layout(
            tuple(k.key for k in p), state[_torch_name(tuple(k.key for k in p), 'base_encoder',
                                                       head)])),
        tree)
  params = {k: v for k, v in template_params.items() if k != 'backbone' or vit}
  stats = {k: v for k, v in template_stats.items() if k != 'backbone' or vit}
  params, stats = fill(params), fill(stats)
  if not vit:
    backbone = {k.split('.', 1)[1]: v for k, v in state.items() if k.startswith('base_encoder.')}
    params['backbone'], stats['backbone'] = jax.tree.map(
        jnp.asarray, torchvision_names.backbone_from_torchvision(backbone, template_params['backbone'],
                                                      template_stats['backbone']))
  return params, stats


# --------------------------------------------------------------------------
# The official step.


def _case_config(case: str, s: dict):
  """Our config of the golden's setting `s`."""
  config = tiny.get_config('mocov3_vit' if case == 'vit' else 'mocov3_resnet')
  config.model.embed_dim, config.model.mlp_dim = int(s['dim']), int(s['mlp_dim'])
  config.data.image_size = int(s['image_size'])
  if case == 'vit':
    assert models.VIT_ARCHS['vit_tiny'] == (s['patch'], s['embed_dim'], s['depth'], s['heads'])
  else:
    config.model.width = int(s['width'])
    config.optim.momentum = float(s['sgd_momentum'])
  config.optim.weight_decay = float(s['weight_decay'])
  config.mocov3.temperature = float(s['temperature'])
  config.mocov3.momentum = float(s['moco_momentum'])
  config.mocov3.momentum_cosine = False  # The golden's m is fixed.
  return config


def run_ours_on_official(case: str):
  """(golden, our losses, our states after each step as official names)."""
  golden = _golden(case)
  s = {k.split('/', 1)[1]: golden[k].item() for k in golden if k.startswith('setting/')}
  config = _case_config(case, s)
  vit = case == 'vit'
  # The official lr is fixed (and not scaled by batch / 256).
  tx = optim.create_optimizer(config, optax.constant_schedule(float(s['lr'])))
  setup = step_lib.make_step_setup(config, 1, tx)
  method = setup.method
  template = jax.eval_shape(functools.partial(state_lib.initial_encoder_variables,
                                              encoder=method.encoder,
                                              image_size=int(s['image_size'])),
                            jax.random.PRNGKey(0))
  init = {k.split('/', 1)[1]: v for k, v in golden.items() if k.startswith('init/')}
  params, batch_stats = from_torch(init, *template, vit=vit)
  state = state_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
      opt_state=tx.init(params), method_state=method.init_state(None, params, batch_stats),
      rng=jax.random.PRNGKey(0))
  mesh = parallel.make_mesh(jax.devices()[:1])
  state = jax.device_put(state, NamedSharding(mesh, P()))

  def step_fn(state, x1, x2):
    batch = base.StepBatch(x1, x2, None, jax.random.PRNGKey(0))
    new_state, loss, _ = step_lib.step_on_views(state, batch, setup)
    return new_state, loss

  step = jax.jit(jax.shard_map(step_fn, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)),
                               out_specs=(P(), P()), check_vma=False))
  ours = []
  for t in range(int(s['steps'])):
    views = jnp.asarray(golden['views'][:, t], jnp.float32) / 64.0 - 2.0
    state, loss = step(state, views[0], views[1])
    named = to_torch(state.params, state.batch_stats, 'base_encoder', vit)
    named.update({k: v for k, v in to_torch(state.method_state.key_params,
                                            state.method_state.key_batch_stats,
                                            'momentum_encoder', vit).items()})
    ours.append((float(loss), {k.replace('base_encoder.predictor', 'predictor'): v
                               for k, v in named.items()}))
  return golden, s, ours


# Bound: both codes compute the same float32 function in different orders, so
# each differs from the exact (float64) value by about the reference's own
# float32 error, stored per array as max |float32 - float64| of the official
# run. Ours is allowed NOISE_FACTOR times that (its own error plus the
# reference's, each of the same size, with margin for summation order), plus
# a floor of ULPS float32 ulps of the array's magnitude for arrays that the
# reference happened to compute exactly.
NOISE_FACTOR = 4.0
ULPS = 8
# AdamW only: optax computes the bias correction 1 - b2^t in float32 (torch in
# float64), so 1 - 0.999 carries up to half an ulp of 0.999 (2^-25), a relative
# error of 2^-25 / 0.001 = 3e-5 in v_hat and half that, 1.5e-5, in every
# update, whose size is at most lr: each AdamW step adds up to 1.5e-5 x lr
# (observed 6.7e-6 x lr on the zero-initialised biases).
ADAM_BIAS_CORRECTION = 1.5e-5

# ViT tensors that, in exact arithmetic, get a zero gradient, so that AdamW's
# first steps (g / (|g| + eps)) turn their rounding noise into moves of up to
# lr in either direction, in both codes alike: the key bias of each attention
# (softmax is shift-invariant) and the final LayerNorm's bias (the projector's
# first Linear has no bias and is followed by BatchNorm, which removes a
# constant shift), and the BatchNorm running mean that this shift reaches.
# They are bounded by the size of those moves instead of compared tightly.
def _zero_gradient_slices(name: str, dim: int):
  if name.endswith('attn.qkv.bias'):
    return slice(dim, 2 * dim)
  if name.endswith('encoder.norm.bias') or name.endswith('encoder.head.1.running_mean'):
    return slice(None)
  return None


def _assert_matches_official(golden, ours, step: int, steps: int):
  loss, named = ours[step - 1]
  names = [str(n) for n in golden['names']]
  noise = dict(zip(names, golden[f'noise{step}/state']))
  adam = str(golden['setting/optimizer']) == 'adamw'
  lr = float(golden['setting/lr'])
  compared = 0
  for name in names:
    key = f'step{step}/{name}'
    if key not in golden or name.endswith('pos_embed'):
      continue  # pos_embed is not a parameter of ours: tested on its own.
    expected, actual = golden[key], np.array(named[name])
    assert name in named, f'{name} missing from ours'
    atol = NOISE_FACTOR * noise[name] + ULPS * np.finfo(np.float32).eps * np.abs(expected).max()
    if adam:
      atol += ADAM_BIAS_CORRECTION * lr * step
      loose = _zero_gradient_slices(name, int(golden['setting/embed_dim']))
      if loose is not None:
        # Bias moves: at most lr per step each side. The running mean sees that
        # shift through head.0 (16 inputs, |w| <= 0.25: x4) with BN momentum
        # 0.1 twice a step: <= 0.2 x 4 x 2 lr x step = 1.6 lr x step.
        np.testing.assert_array_less(np.abs(actual[loose] - expected[loose]), 2 * lr * step)
        actual[loose] = expected[loose]
    np.testing.assert_allclose(actual, expected, rtol=0, atol=atol, err_msg=name)
    compared += 1
  # Every official tensor of the base encoder and predictor (and at the last
  # step the momentum encoder) was compared.
  expected_count = sum(1 for n in names if f'step{step}/{n}' in golden
                       and not n.endswith('pos_embed'))
  assert compared == expected_count > 10
  golden_loss = float(golden[f'step{step}/loss'])
  bound = (NOISE_FACTOR * float(golden[f'noise{step}/loss'])
           + ULPS * np.finfo(np.float32).eps * abs(golden_loss))
  assert abs(loss - golden_loss) <= bound, (loss, golden_loss, bound)
  del steps


@pytest.fixture(scope='module', params=['resnet', 'vit'])
def official_mocov3(request):
  with helpers.xla_optimized():
    return (request.param,) + run_ours_on_official(request.param)


def test_mocov3_two_official_steps_match_to_float32_rounding(official_mocov3):
  """Loss, both encoders, predictor, BN statistics after steps 1 and 2 (LARS / AdamW)."""
  _, golden, s, ours = official_mocov3
  for step in (1, 2):
    _assert_matches_official(golden, ours, step, int(s['steps']))


def test_vit_position_embedding_and_frozen_patch_projection_are_official(official_mocov3):
  case, golden, _, ours = official_mocov3
  if case != 'vit':
    pytest.skip('ViT only')
  grid = int(golden['setting/image_size']) // int(golden['setting/patch'])
  ours_pe = models.sincos_position_embedding(grid, int(golden['setting/embed_dim']))
  np.testing.assert_allclose(ours_pe, golden['init/base_encoder.pos_embed'][0], rtol=0,
                             atol=4 * np.finfo(np.float32).eps)
  # stop_grad_conv1: the patch projection never moves (no gradient, no decay).
  _, named = ours[-1]
  for leaf in ('weight', 'bias'):
    np.testing.assert_array_equal(named[f'base_encoder.patch_embed.proj.{leaf}'],
                                  golden[f'init/base_encoder.patch_embed.proj.{leaf}'])


# --------------------------------------------------------------------------
# Formulas.


def test_mocov3_momentum_follows_the_half_cosine_schedule():
  m0, total = 0.99, 100
  for step in (0, 25, 50, 100):
    expected = 1 - (1 - m0) * (1 + math.cos(math.pi * step / total)) / 2
    np.testing.assert_allclose(float(mocov3.momentum_at(step, total, m0, True)), expected,
                               rtol=1e-6)
  assert float(mocov3.momentum_at(7, total, m0, False)) == np.float32(m0)


def test_mocov3_loss_matches_a_slow_reference_with_gathered_keys_and_rank_labels():
  """symmetric_contrastive_loss on 4 devices = NumPy CE over the global batch, x 2T."""
  rng = np.random.default_rng(0)
  devices, n, dim, t = 4, 3, 5, 0.2
  q = rng.normal(size=(devices * n, dim)).astype(np.float32)
  k = rng.normal(size=(devices * n, dim)).astype(np.float32)
  mesh = parallel.make_mesh(jax.devices()[:devices])
  fn = jax.jit(jax.shard_map(lambda a, b: jax.tree.map(lambda x: x[None], mocov3.symmetric_contrastive_loss(a, b, t)),
                             mesh=mesh,
                             in_specs=(P(AXIS), P(AXIS)), out_specs=(P(AXIS), P(AXIS)),
                             check_vma=False))
  losses, _ = fn(q, k)
  qn = q / np.linalg.norm(q, axis=1, keepdims=True)
  kn = k / np.linalg.norm(k, axis=1, keepdims=True)
  logits = qn.astype(np.float64) @ kn.T / t
  for d in range(devices):
    rows = logits[d * n:(d + 1) * n]
    labels = np.arange(n) + n * d
    ce = np.mean(np.log(np.exp(rows).sum(1)) - rows[np.arange(n), labels])
    np.testing.assert_allclose(np.asarray(losses).reshape(devices)[d], ce * 2 * t, rtol=1e-5)


def test_lars_mocov3_applies_lr_after_momentum_like_the_official_code():
  """Two steps at lrs 1 and 2: p -= lr (m mu + g'), not mu = m mu + lr g'."""
  p = {'w': jnp.array([[3.0, 4.0]]), 'b': jnp.array([1.0])}
  g = {'w': jnp.array([[0.6, 0.8]]), 'b': jnp.array([0.5])}
  tx = optim.lars_mocov3(lambda step: jnp.where(step == 0, 1.0, 2.0), weight_decay=0.0,
                         momentum=0.9)
  opt = tx.init(p)
  u1, opt = tx.update(g, opt, p)
  u2, _ = tx.update(g, opt, p)
  # w: |p| = 5, |g| = 1: g' = 0.001 x 5 g; b (1-d): g' = g.
  gw = 0.005 * np.array([[0.6, 0.8]])
  np.testing.assert_allclose(u1['w'], -1.0 * gw, rtol=1e-6)
  np.testing.assert_allclose(u2['w'], -2.0 * (0.9 * gw + gw), rtol=1e-6)
  np.testing.assert_allclose(u2['b'], -2.0 * (0.9 * 0.5 + 0.5), rtol=1e-6)


# --------------------------------------------------------------------------
# Devices and resume.


def _run(config, devices, steps=2):
  mesh = parallel.make_mesh(devices)
  lr = optim.create_learning_rate_fn(config, steps_per_epoch=4, total_steps=8)
  tx = optim.create_optimizer(config, lr)
  setup = step_lib.make_step_setup(config, len(devices), tx, total_steps=8)
  state = step_lib.init_state(config, setup, mesh)
  step = step_lib.make_sharded_step(setup, lr, mesh)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(steps):
    size = config.data.image_size
    images = rng.integers(0, 256, (config.batch_size, size, size, 3), dtype=np.uint8)
    indices = np.arange(config.batch_size, dtype=np.int32)
    state, metrics = step(state, parallel.shard_batch(images, mesh),
                          parallel.shard_batch(indices, mesh))
    losses.append(float(metrics['train_loss']))
  return jax.device_get(state), losses


@pytest.mark.parametrize('variant', ['mocov3_resnet', 'mocov3_vit'])
def test_mocov3_one_and_eight_devices_agree(variant):
  """SyncBN and all-gathered keys: the global batch decides, not its split."""
  config = tiny.get_config(variant)
  # Small enough to compile quickly on 8 simulated devices (2 examples each).
  config.batch_size, config.data.image_size, config.model.width = 16, 16, 4
  with rounding.precise(config):  # Equal to float64 rounding (tests/rounding.py).
    one, one_losses = _run(config, jax.devices()[:1])
    eight, eight_losses = _run(config, jax.devices()[:8])
  rounding.assert_logged_agree([{'loss': x} for x in eight_losses],
                               [{'loss': x} for x in one_losses])
  rounding.assert_agree_to_rounding(eight, one, f'{variant} state')
  assert int(one.method_state.step) == 2


def test_mocov3_config_checks_name_the_field():
  config = tiny.get_config('mocov3_vit')
  config.model.patch_size = 5
  with pytest.raises(Exception, match='config.model.patch_size'):
    mocov3.MoCoV3.check_config(config, 1)
  config = default.get_config()
  config.method, config.mocov3.temperature = 'mocov3', 0.0
  with pytest.raises(Exception, match='config.mocov3.temperature'):
    mocov3.MoCoV3.check_config(config, 1)


# --------------------------------------------------------------------------
# BYOL's asymmetric augmentation.


def test_mocov3_solarize_and_per_view_probabilities():
  """Identity crop, no jitter/gray/blur/flip: view 1 = x, view 2 = solarize(x) (p 0 / 1)."""
  from moco_jax.augmentation import augment  # pylint: disable=g-import-not-at-top
  from moco_jax.augmentation import image_ops  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  aug = config.aug
  aug.crop_scale, aug.crop_ratio = (1.0, 1.0), (1.0, 1.0)
  aug.jitter_prob, aug.grayscale_prob, aug.blur_prob, aug.flip = 0.0, 0.0, 0.0, False
  aug.mean, aug.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
  aug.solarize_prob, aug.second_view_solarize_prob = 0.0, 1.0
  images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
  first, second = augment.two_views(jax.random.PRNGKey(0), jnp.asarray(images), jnp.arange(3),
                                    aug, 8)
  x = images.astype(np.float32) / 255.0
  np.testing.assert_allclose(first, x, atol=1e-6)
  # PIL's ImageOps.solarize on uint8: 255 - v for v >= 128, as floats.
  expected = np.where(images >= 128, 255 - images.astype(np.int32), images) / 255.0
  np.testing.assert_allclose(second, expected, atol=1e-6)
  np.testing.assert_array_equal(image_ops.solarize(jnp.asarray([0.5, 0.502, 1.0])),
                                np.float32([0.5, 1 - np.float32(0.502), 0.0]))
  assert augment.view_probs(aug, 'blur') == (0.0, 0.0)
  aug.blur_prob, aug.second_view_blur_prob = 1.0, 0.1
  assert augment.view_probs(aug, 'blur') == (1.0, 0.1)


# --------------------------------------------------------------------------
# Resume and evaluation.


@pytest.mark.slow
def test_mocov3_vit_resumes_bit_identically_and_evaluates(tmp_path, monkeypatch):
  """Crash after step 2 (checkpoint 2), rerun: the uninterrupted 4-step state, bit for bit."""
  config = tiny.get_config('mocov3_vit')
  config.num_train_steps, config.checkpoint_every_steps, config.log_every_steps = 4, 2, 1
  straight = jax.device_get(pretrain.train_and_evaluate(config, str(tmp_path / 'straight')))
  workdir = tmp_path / 'resumed'
  resumed = jax.device_get(
      helpers.crash_after_checkpoint_and_rerun(config, workdir, monkeypatch, checkpoint=2))
  helpers.assert_same_state(straight, resumed)
  assert int(resumed.method_state.step) == 4
  # Every evaluation reads the ViT backbone from the checkpoint: class-token features.
  backbone, variables, step, _ = frozen.load_backbone(config, str(workdir))
  assert step == 4
  out = backbone.apply(variables, jnp.zeros((2, 32, 32, 3)), train=False)
  assert out.shape == (2, models.VIT_ARCHS['vit_tiny'][1])


def test_vit_checkpoint_mismatch_names_the_vit():
  config = tiny.get_config('mocov3_vit')
  shapes = describe.expected_backbone_shapes(config.model)
  patch, dim, depth, _ = models.VIT_ARCHS['vit_tiny']
  assert describe.describe_backbone(shapes) == f'ViT (patch {patch}, width {dim}, depth {depth})'
