"""The MoCo step: EMA, gradients, queue, devices and Shuffle BN."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import helpers
import rounding
from moco_jax.core import parallel
from moco_jax.data import batching
from moco_jax.data import sources
from moco_jax.methods import base
from moco_jax.methods import contrastive
from moco_jax.training import optim
from moco_jax.training import step as step_lib

AXIS = parallel.AXIS


def _config(bn_mode='sync', **overrides):
  # moco.momentum 0.9: large enough that the EMA visibly moves.
  return helpers.tiny_config(**dict(dict(moco__bn_mode=bn_mode, moco__momentum=0.9,
                                         optim__base_lr=0.5), **overrides))


def _setup(config, num_devices):
  lr = optim.create_learning_rate_fn(config, steps_per_epoch=4, total_steps=8)
  tx = optim.create_optimizer(config, lr)
  setup = step_lib.make_step_setup(config, num_devices, tx)
  # Built by the compiled initialiser, then brought to the host for the tests to share.
  state = jax.device_get(step_lib.init_state(config, setup, parallel.make_mesh(jax.devices()[:1])))
  return setup, lr, state


def _batch(config, step=0):
  ds = sources.from_config(config).load('train')
  return next(batching.train_batches(ds, global_batch=config.batch_size, seed=0,
                                     start_step=step))


def _images(config, step=0):
  return _batch(config, step)['image']


def _run_steps(config, devices, num_steps=2):
  """States after 0..num_steps steps (host copies) and the metrics of each step."""
  mesh = parallel.make_mesh(devices)
  setup, lr, state = _setup(config, len(devices))
  state = parallel.replicate(state, mesh)
  step = step_lib.make_sharded_step(setup, lr, mesh)
  states, metrics = [jax.device_get(state)], []
  for i in range(num_steps):
    batch = _batch(config, i)
    state, m = step(state, parallel.shard_batch(batch['image'], mesh),
                    parallel.shard_batch(batch['index'], mesh))
    states.append(jax.device_get(state))
    metrics.append(jax.device_get(m))
  return states, metrics


@pytest.fixture(scope='module')
def sync_runs():
  """Two steps with sync BN on 1 and on 8 devices (shared: compiling is the slow part)."""
  config = _config('sync', optim__weight_decay=0.1, data__image_size=rounding.IMAGE_SIZE)
  with rounding.precise(config):  # float64: 1 vs 8 devices differ by float64 rounding alone.
    return config, _run_steps(config, jax.devices()[:1]), _run_steps(config, jax.devices())


def _per_device(fn, mesh, in_specs):
  """shard_map with every output stacked per device, to compare devices."""
  def stacked(*args):
    return jax.tree.map(lambda x: x[None], fn(*args))
  return jax.jit(jax.shard_map(stacked, mesh=mesh, in_specs=in_specs, out_specs=P(AXIS),
                               check_vma=False))


def test_ema_update_is_exact_and_key_gets_no_weight_decay(sync_runs):
  config, _, (states, _) = sync_runs
  m = config.moco.momentum
  for before, after in zip(states[:-1], states[1:]):
    expected = jax.tree.map(lambda k, q: m * k + (1 - m) * q, before.method_state.key_params,
                            after.params)
    for got, want in zip(jax.tree.leaves(after.method_state.key_params),
                         jax.tree.leaves(expected)):
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  # The key starts as a copy of the query; the query did move.
  for k, q in zip(jax.tree.leaves(states[0].method_state.key_params),
                  jax.tree.leaves(states[0].params)):
    np.testing.assert_array_equal(k, q)
  moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(states[1].params),
                                                 jax.tree.leaves(states[0].params))]
  assert max(moved) > 0


def test_gradient_flows_to_query_only():
  config = _config()
  mesh = parallel.make_mesh(jax.devices()[:1])
  setup, _, state = _setup(config, 1)
  images = _images(config)

  def grads(state, images):
    query_view, key_view, rng = step_lib.augment_views(state, images, setup)
    batch = base.StepBatch(query_view, key_view, None, rng)
    def loss(qp, kp):
      method_state = state.method_state.replace(key_params=kp)
      return setup.method.loss(qp, state.batch_stats, method_state, batch)[0]
    return jax.grad(loss, argnums=(0, 1))(state.params, state.method_state.key_params)

  grad_q, grad_k = _per_device(grads, mesh, (P(), P(AXIS)))(state, images)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad_k)) == 0.0
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad_q)) > 0.0


def test_queue_identical_on_all_devices_and_holds_gathered_keys_in_order():
  config = _config('local')
  devices = jax.devices()
  mesh = parallel.make_mesh(devices)
  setup, lr, state = _setup(config, len(devices))
  batch = _batch(config)
  images = batch['image']
  step = functools.partial(step_lib.train_step, setup=setup, learning_rate_fn=lr)
  new_state, _ = _per_device(lambda s, x, i: step(s, x, indices=i), mesh,
                             (P(), P(AXIS), P(AXIS)))(state, images, batch['index'])
  queues = np.asarray(new_state.method_state.queue)
  for d in range(1, len(devices)):
    np.testing.assert_array_equal(queues[d], queues[0])

  # Reference: each device's keys from its own slice (local BN), concatenated in device order.
  local = config.batch_size // len(devices)
  query_view, key_view, _ = _per_device(lambda s, x: step_lib.augment_views(s, x, setup), mesh,
                                        (P(), P(AXIS)))(state, images)
  key = state.method_state
  encode = jax.jit(lambda x: contrastive.l2_normalize(setup.method.encoder.apply(
      {'params': key.key_params, 'batch_stats': key.key_batch_stats}, x,
      train=True, mutable=['batch_stats'])[0]))
  expected = np.concatenate([encode(key_view[d]) for d in range(len(devices))])
  assert expected.shape[0] == local * len(devices)
  np.testing.assert_allclose(queues[0][:config.batch_size], expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(new_state.method_state.queue_ptr), config.batch_size)
  # The rows not yet overwritten still hold the initial queue.
  np.testing.assert_array_equal(queues[0][config.batch_size:],
                                np.asarray(state.method_state.queue)[config.batch_size:])


def test_one_and_eight_devices_agree_with_sync_bn(sync_runs):
  """Every array after two steps, to float64 rounding (tests/rounding.py)."""
  config, (one_states, one_metrics), (eight_states, eight_metrics) = sync_runs
  rounding.assert_logged_agree(eight_metrics, one_metrics)
  rounding.assert_agree_to_rounding(eight_states[-1], one_states[-1], 'MoCo sync BN state')
  assert int(one_states[-1].method_state.queue_ptr) == 2 * config.batch_size


def _shuffled_reference_keys(setup, state, key_view, rng, num_devices):
  """Slow reference: permute the whole batch, encode per device chunk, scatter back."""
  perm = np.asarray(jax.random.permutation(rng, key_view.shape[0]))
  shuffled = key_view[perm]
  chunks = np.split(shuffled, num_devices)
  variables = {'params': state.method_state.key_params,
               'batch_stats': state.method_state.key_batch_stats}
  outs = [setup.method.encoder.apply(variables, c, train=True, mutable=['batch_stats'])[0]
          for c in chunks]
  keys = np.empty((key_view.shape[0], outs[0].shape[1]), np.float32)
  keys[perm] = np.concatenate(outs)
  return np.asarray(contrastive.l2_normalize(keys)), perm


@pytest.mark.parametrize('num_devices', [1, 8])
def test_shuffle_bn_permutation_is_undone(num_devices):
  config = _config('shuffle')
  mesh = parallel.make_mesh(jax.devices()[:num_devices])
  setup, _, state = _setup(config, num_devices)
  rng = jax.random.PRNGKey(7)
  key_view = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (config.batch_size, 32, 32, 3)))

  def encode(x):
    return contrastive.encode_keys(setup.method.encoder, state.method_state.key_params,
                                   state.method_state.key_batch_stats, x, rng, shuffle=True)[0]

  keys = jax.jit(jax.shard_map(encode, mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS),
                               check_vma=False))(key_view)
  expected, perm = _shuffled_reference_keys(setup, state, key_view, rng, num_devices)
  assert not np.array_equal(perm, np.arange(len(perm)))
  np.testing.assert_allclose(keys, expected, rtol=1e-4, atol=1e-5)
  # Without the shuffle, BN groups hold other examples: the keys would differ.
  unshuffled = jax.jit(jax.shard_map(
      lambda x: contrastive.encode_keys(setup.method.encoder, state.method_state.key_params,
                                        state.method_state.key_batch_stats, x, rng,
                                        shuffle=False)[0],
      mesh=mesh, in_specs=P(AXIS), out_specs=P(AXIS), check_vma=False))(key_view)
  assert np.abs(np.asarray(unshuffled) - expected).max() > 1e-3


def test_bn_splits_default_to_eight_groups_in_total():
  config = _config('shuffle')
  assert contrastive.bn_groups_per_device(config.moco.bn_mode, config.moco.bn_splits, 1) == 8
  assert contrastive.bn_groups_per_device(config.moco.bn_mode, config.moco.bn_splits, 8) == 1
  config.moco.bn_splits = 4
  assert contrastive.bn_groups_per_device(config.moco.bn_mode, config.moco.bn_splits, 8) == 4
  config.moco.bn_mode = 'sync'
  assert contrastive.bn_groups_per_device(config.moco.bn_mode, config.moco.bn_splits, 1) == 1


def test_learning_rate_scales_with_batch_and_follows_cosine():
  config = _config()
  config.batch_size = 512
  config.optim.base_lr = 0.03
  lr = optim.create_learning_rate_fn(config, steps_per_epoch=10, total_steps=100)
  np.testing.assert_allclose(lr(0), 0.06, rtol=1e-6)
  np.testing.assert_allclose(lr(50), 0.03, rtol=1e-5)
  np.testing.assert_allclose(lr(100), 0.0, atol=1e-7)
  config.optim.warmup_epochs = 1.0
  lr = optim.create_learning_rate_fn(config, steps_per_epoch=10, total_steps=100)
  np.testing.assert_allclose(lr(5), 0.03, rtol=1e-6)
  config.optim.warmup_epochs = 0.0
  config.optim.schedule = 'step'
  config.optim.step_epochs = (5, 8)
  lr = optim.create_learning_rate_fn(config, steps_per_epoch=10, total_steps=100)
  np.testing.assert_allclose([lr(49), lr(50), lr(80)], [0.06, 0.006, 0.0006], rtol=1e-5)


def test_sgd_matches_torch_semantics():
  """torch.optim.SGD: buf = mu * buf + (g + wd * p); p -= lr * buf."""
  config = _config(optim__weight_decay=0.01)
  tx = optim.create_optimizer(config, 0.1)
  p = {'w': jnp.array([1.0, -2.0])}
  opt = tx.init(p)
  buf = np.zeros(2)
  ref = np.array([1.0, -2.0])
  for g in ([0.5, 0.5], [1.0, -1.0]):
    updates, opt = tx.update({'w': jnp.array(g)}, opt, p)
    p = jax.tree.map(lambda a, b: a + b, p, updates)
    buf = config.optim.momentum * buf + (np.array(g) + 0.01 * ref)
    ref = ref - 0.1 * buf
    np.testing.assert_allclose(p['w'], ref, rtol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_loss():
  config = _config('local')
  mesh = parallel.make_mesh(jax.devices()[:1])
  images = _images(config)
  losses_by_dtype = {}
  for dtype in ('float32', 'bfloat16'):
    config.model.dtype = dtype
    setup, _, state = _setup(config, 1)

    def loss(state, images):
      query_view, key_view, rng = step_lib.augment_views(state, images, setup)
      assert query_view.dtype == jnp.dtype(dtype)
      batch = base.StepBatch(query_view, key_view, None, rng)
      value, aux = setup.method.loss(state.params, state.batch_stats, state.method_state, batch)
      assert value.dtype == jnp.float32 and aux.local.dtype == jnp.float32
      return value

    losses_by_dtype[dtype] = float(_per_device(loss, mesh, (P(), P(AXIS)))(state, images)[0])
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  # InfoNCE is Lipschitz in its logits, |dL| <= 2 max |dz|, and z = q.k / T for unit q and k,
  # so |dz| <= (|dq| + |dk|) / T. Bound: every unit feature within 2 bfloat16 units of
  # roundoff (u = 2^-8) of its float32 value, i.e. |dL| <= 2 * 4u / T; the bfloat16 rounding
  # of the views alone is 1 u, and no CPU changes the size of a bfloat16 rounding.
  # Measured: 4e-5 (fast math, other ISAs: up to 1.3e-4), the bound 0.16 at T = 0.2.
  u = 2.0**-8
  bound = 8 * u / config.moco.temperature
  assert abs(losses_by_dtype['bfloat16'] - losses_by_dtype['float32']) <= bound, losses_by_dtype
