"""End-to-end and memory bank (MoCo v1 Fig. 2a/2b) against slow references written differently."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import helpers
import rounding
from configs import tiny
from moco_jax.core import errors
from moco_jax.core import parallel
from moco_jax.data import batching
from moco_jax.data import sources
from moco_jax.evaluation import knn
from moco_jax.methods import base
from moco_jax.methods import memory_bank
from moco_jax import models
from moco_jax import pretrain
from moco_jax.run import checkpoints
from moco_jax import config_checks
from moco_jax.training import optim
from moco_jax.training import step as step_lib

AXIS = parallel.AXIS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# float32 results reduced in another order (1 device vs 8, a loop vs a matmul): each sum of
# n terms may differ by about n * eps relative to the sum of magnitudes; the largest sums here
# are over the 64-image batch x 3x3x8 conv taps (~600 terms): 600 * 6e-8 = 4e-5. rtol 2e-4
# leaves 5x room; atol covers entries that cancel to ~0.
RTOL, ATOL = 2e-4, 2e-6


def _config(method, **overrides):
  return helpers.tiny_config(**dict(dict(
      method=method, end_to_end__bn_mode='local', memory_bank__num_negatives=50,
      memory_bank__bn_mode='sync', optim__base_lr=0.5), **overrides))


run_config = helpers.run_config


def _setup(config, num_devices, num_examples):
  lr = optim.create_learning_rate_fn(config, steps_per_epoch=4, total_steps=8)
  setup = step_lib.make_step_setup(config, num_devices, optim.create_optimizer(config, lr),
                                   num_examples=num_examples)
  state = jax.device_get(step_lib.init_state(config, setup, parallel.make_mesh(jax.devices()[:1])))
  return setup, lr, state


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _views(config, num, seed=0):
  rng = np.random.default_rng(seed)
  shape = (num, config.data.image_size, config.data.image_size, 3)
  return rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)


# --------------------------------------------------------------------------
# End-to-end.


def _reference_infonce(q, k, temperature):
  """Mean over queries of -log(exp(q_i.k_i/T) / sum_j exp(q_i.k_j/T)), one row at a time."""
  total = 0.0
  for i in range(len(q)):
    scores = [float(np.dot(q[i], k[j])) / temperature for j in range(len(k))]
    top = max(scores)
    total += -(scores[i] - top - np.log(sum(np.exp(s - top) for s in scores)))
  return total / len(q)


@pytest.mark.parametrize('num_devices', [1, 8])
def test_end_to_end_loss_and_gradients_through_both_encoders_match_a_reference(num_devices):
  """Loss = reference InfoNCE over the global batch; grad = d/dq-encoder + d/dk-encoder.

  On 8 devices the keys' gradient must come back from every device through the all-gather.
  """
  config = _config('end_to_end')  # 'local' BatchNorm: one group per device.
  setup, _, state = _setup(config, num_devices, 0)
  method = setup.method
  query_view, key_view = _views(config, config.batch_size)
  rng = jax.random.PRNGKey(3)

  # The same network on one device, BatchNorm in one group per device of the sharded run.
  encoder = models.create_encoder(config.model, bn_splits=num_devices)

  def encode(params, images):
    out, _ = encoder.apply({'params': params, 'batch_stats': state.batch_stats}, images,
                                  train=True, mutable=['batch_stats'])
    return out / jnp.linalg.norm(out, axis=-1, keepdims=True)

  # The reference: two parameter arguments, one per view, InfoNCE written with log_softmax.
  def split_loss(query_params, key_params):
    logits = encode(query_params, query_view) @ encode(key_params, key_view).T / method.temperature
    return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))

  # Compiled whole: op by op, the reference took longer than the step it checks.
  grad_q, grad_k = jax.jit(jax.grad(split_loss, argnums=(0, 1)))(state.params, state.params)
  q = np.asarray(jax.jit(encode)(state.params, query_view))
  k = np.asarray(jax.jit(encode)(state.params, key_view))
  want_loss = _reference_infonce(q, k, method.temperature)
  # The key path carries a real share of the gradient.
  key_share = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad_k))
  assert key_share > 1e-3 * max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad_q))
  want_grad = jax.tree.map(np.add, jax.device_get(grad_q), jax.device_get(grad_k))

  for devices in (jax.devices()[:num_devices],):
    mesh = parallel.make_mesh(devices)

    def device_loss(params, qv, kv):
      batch = base.StepBatch(qv, kv, None, rng)
      (loss, aux), grads = jax.value_and_grad(method.loss, has_aux=True)(
          params, state.batch_stats, (), batch)
      return jax.lax.pmean((loss, grads, aux.accuracy), AXIS)

    fn = jax.jit(jax.shard_map(device_loss, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)),
                               out_specs=P(), check_vma=False))
    loss, grads, _ = jax.device_get(fn(state.params, query_view, key_view))
    np.testing.assert_allclose(loss, want_loss, rtol=RTOL)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grad)):
      np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL * np.abs(want).max())


# --------------------------------------------------------------------------
# Memory bank.


def _reference_bank_loss(q, bank, indices, negatives, temperature):
  """InfoNCE with the bank row of each query's image as positive, the drawn rows but its own as negatives."""
  total = 0.0
  for i, own in enumerate(indices):
    pos = float(np.dot(q[i], bank[own])) / temperature
    negs = [float(np.dot(q[i], bank[j])) / temperature for j in negatives if j != own]
    scores = np.array([pos] + negs, np.float64)
    total += np.log(np.exp(scores - scores.max()).sum()) + scores.max() - pos
  return total / len(indices)


def test_bank_logits_exclude_the_positive_and_match_a_reference():
  rng = np.random.default_rng(0)
  bank = _unit(rng.normal(size=(20, 8))).astype(np.float32)
  q = _unit(rng.normal(size=(6, 8))).astype(np.float32)
  indices = np.array([3, 7, 0, 19, 12, 5], np.int32)
  negatives = np.array([7, 1, 3, 3, 18, 0, 11], np.int32)  # Holds three queries' positives.
  logits = memory_bank.bank_logits(q, bank, indices, negatives, 0.1)
  from moco_jax.methods import contrastive  # pylint: disable=g-import-not-at-top
  loss, _ = contrastive.cross_entropy(logits, jnp.zeros(6, jnp.int32))
  np.testing.assert_allclose(loss, _reference_bank_loss(q, bank, indices, negatives, 0.1),
                             rtol=1e-5)
  # Row 0 (image 3) has its own row drawn twice: both masked, the other 5 kept.
  assert int(np.isinf(np.asarray(logits[0, 1:])).sum()) == 2
  assert int(np.isinf(np.asarray(logits[4, 1:])).sum()) == 0


def test_negatives_are_uniform_over_the_bank():
  draws = np.asarray(memory_bank.sample_negatives(jax.random.PRNGKey(0), 5, 50_000))
  assert draws.min() >= 0 and draws.max() <= 4
  counts = np.bincount(draws, minlength=5)
  # Binomial(50000, 0.2): sd = sqrt(50000 * 0.2 * 0.8) = 89; 5 sd.
  assert np.all(np.abs(counts - 10_000) < 5 * 89)


def test_proximal_update_matches_a_reference():
  rng = np.random.default_rng(1)
  bank = _unit(rng.normal(size=(10, 4))).astype(np.float32)
  q = _unit(rng.normal(size=(3, 4))).astype(np.float32)
  indices = np.array([8, 2, 5], np.int32)
  got = np.asarray(memory_bank.proximal_update(jnp.asarray(bank), indices, q, 0.5))
  want = bank.copy()
  for i, row in zip(indices, q):
    v = 0.5 * bank[i] + 0.5 * row
    want[i] = v / np.sqrt(np.sum(v * v))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def _images_and_indices(config, step):
  ds = sources.from_config(config).load('train')
  batch = next(batching.train_batches(ds, global_batch=config.batch_size, seed=0,
                                      start_step=step, prefetch=0))
  return batch['image'], batch['index'], len(ds)


def _run_bank_steps(config, devices, num_steps=2):
  mesh = parallel.make_mesh(devices)
  _, _, num_examples = _images_and_indices(config, 0)
  setup, lr, state = _setup(config, len(devices), num_examples)
  state = parallel.replicate(state, mesh)
  step = step_lib.make_sharded_step(setup, lr, mesh)
  states, metrics = [jax.device_get(state)], []
  for i in range(num_steps):
    images, indices, _ = _images_and_indices(config, i)
    state, m = step(state, parallel.shard_batch(images, mesh), parallel.shard_batch(indices, mesh))
    states.append(jax.device_get(state))
    metrics.append(jax.device_get(m))
  return setup, states, metrics


@pytest.fixture(scope='module')
def bank_runs():
  config = _config('memory_bank', data__image_size=rounding.IMAGE_SIZE)
  with rounding.precise(config):  # 1 vs 8 devices then differ by float64 rounding alone.
    return config, _run_bank_steps(config, jax.devices()[:1]), _run_bank_steps(config, jax.devices())


def test_memory_bank_step_loss_and_update_match_a_reference(bank_runs):
  with jax.enable_x64(rounding.DTYPE == 'float64'):  # bank_runs ran in float64.
    config, (setup, states, metrics), _ = bank_runs
    before, after = states[0], states[1]
    images, indices, _ = _images_and_indices(config, 0)
    # The rows of the batch moved towards the new queries, the others did not.
    bank0, bank1 = before.method_state.bank, after.method_state.bank
    untouched = np.setdiff1d(np.arange(len(bank0)), indices)
    np.testing.assert_array_equal(bank1[untouched], bank0[untouched])
    assert np.all(np.abs(bank1[indices] - bank0[indices]).max(axis=1) > 0)
    np.testing.assert_allclose(np.linalg.norm(bank1, axis=1), 1.0, rtol=1e-6)
    # Each new row is normalize(m v + (1 - m) q), with q recomputed from the step's own query
    # views and the pre-step encoder (a slow path beside the step).
    mesh = parallel.make_mesh(jax.devices()[:1])

    def queries(state, images):
      query_view, _, _ = step_lib.augment_views(state, images, setup)
      out, _ = setup.method.encoder.apply(
          {'params': state.params, 'batch_stats': state.batch_stats}, query_view, train=True,
          mutable=['batch_stats'])
      return out

    q = np.asarray(jax.jit(jax.shard_map(queries, mesh=mesh, in_specs=(P(), P(AXIS)),
                                         out_specs=P(AXIS), check_vma=False))(before, images))
    q = _unit(q.astype(np.float64))
    m = config.memory_bank.momentum
    want = _unit(m * bank0[indices].astype(np.float64) + (1 - m) * q)
    np.testing.assert_allclose(bank1[indices], want, rtol=RTOL, atol=1e-5)
    # The step's loss: the reference over the same K rows the step drew from its method key.
    negatives = np.asarray(memory_bank.sample_negatives(
        step_lib.state_lib.step_rngs(before.rng, 0)[1], len(bank0), setup.method.num_negatives))
    want_loss = _reference_bank_loss(q, bank0.astype(np.float64), indices, negatives,
                                     setup.method.temperature)
    np.testing.assert_allclose(metrics[0]['train_loss'], want_loss, rtol=RTOL)


def test_memory_bank_one_and_eight_devices_agree(bank_runs):
  _, (_, one, one_metrics), (_, eight, eight_metrics) = bank_runs
  rounding.assert_logged_agree(eight_metrics, one_metrics)
  for step, (a, b) in enumerate(zip(one[1:], eight[1:]), 1):
    rounding.assert_agree_to_rounding(b, a, f'memory bank state after step {step}')


def test_end_to_end_one_and_eight_devices_agree_under_shuffle_bn():
  """Shuffle BN with 8 groups in all: the same groups, the same step on 1 device and on 8."""
  config = _config('end_to_end', end_to_end__bn_mode='shuffle',
                   data__image_size=rounding.IMAGE_SIZE)
  runs = []
  with rounding.precise(config):  # Equal to float64 rounding (tests/rounding.py).
    for devices in (jax.devices()[:1], jax.devices()):
      mesh = parallel.make_mesh(devices)
      images, indices, n = _images_and_indices(config, 0)
      setup, lr, state = _setup(config, len(devices), n)
      step = step_lib.make_sharded_step(setup, lr, mesh)
      state, metrics = step(parallel.replicate(state, mesh), parallel.shard_batch(images, mesh),
                            parallel.shard_batch(indices, mesh))
      runs.append(jax.device_get((state, metrics)))
  (one, m1), (eight, m8) = runs
  rounding.assert_logged_agree([m8], [m1])
  rounding.assert_agree_to_rounding(eight, one, 'end-to-end state')


@pytest.mark.parametrize('method,field,value,needle', [
    ('end_to_end', 'bn_mode', 'sync', "config.end_to_end.bn_mode='sync' is not one of"),
    ('end_to_end', 'temperature', 0.0, 'config.end_to_end.temperature=0.0 must be > 0'),
    ('end_to_end', 'bn_splits', 3, 'config.end_to_end.bn_splits=3'),
    ('memory_bank', 'num_negatives', 0, 'config.memory_bank.num_negatives=0 must be > 0'),
    ('memory_bank', 'momentum', 1.0, 'config.memory_bank.momentum=1.0 must be in [0, 1)'),
    ('memory_bank', 'bn_mode', 'shuffle', "config.memory_bank.bn_mode='shuffle' is not one of"),
])
def test_bad_method_values_are_rejected_with_the_field_name(method, field, value, needle):
  config = _config(method, end_to_end__bn_mode='shuffle')
  config[method][field] = value
  with pytest.raises(errors.ConfigError) as info:
    config_checks.validate(config, num_devices=8)
  assert needle in str(info.value)


def test_memory_bank_without_indices_fails_clearly():
  """The sharded step always passes indices; a StepBatch built without them is refused."""
  config = _config('memory_bank')
  _, _, n = _images_and_indices(config, 0)
  setup, _, state = _setup(config, 1, n)
  q, k = _views(config, 4)
  batch = base.StepBatch(q, k, None, jax.random.PRNGKey(0))
  with pytest.raises(errors.ConfigError, match='dataset index'):
    setup.method.loss(state.params, state.batch_stats, state.method_state, batch)
  with pytest.raises(errors.ConfigError, match='train split size'):
    _setup(config, 1, 0)


@pytest.mark.slow
def test_memory_bank_sigkill_resume_is_bit_identical_and_knn_reads_it(tmp_path):
  """`python main.py` killed with SIGKILL, rerun: the same bank and encoder; then kNN on it."""
  steps = 8
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(2),
             JAX_PLATFORMS='cpu')

  def command(workdir):
    return [sys.executable, 'main.py', '--config=configs/tiny.py', f'--workdir={workdir}',
            '--config.method=memory_bank', '--config.memory_bank.num_negatives=100',
            f'--config.num_train_steps={steps}', '--config.checkpoint_every_steps=2',
            '--config.log_every_steps=1']

  subprocess.run(command(tmp_path / 'straight'), cwd=ROOT, env=env, check=True,
                 capture_output=True, timeout=600)
  # A train split of another size cannot resume the bank (one row per image): one line naming
  # the bank's two shapes, even with the config change allowed.
  grown = subprocess.run(
      command(tmp_path / 'straight') + [f'--config.num_train_steps={steps + 2}',
                                        '--config.data.synthetic_examples=128',
                                        '--config.allow_config_change=True'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert grown.returncode == 2 and 'Traceback' not in grown.stderr, grown.stderr[-2000:]
  assert 'method_state/bank [256, 16] in the checkpoint, [128, 16] now' in grown.stderr
  killed = tmp_path / 'killed'
  finished_before_kill = helpers.sigkill_after_checkpoint(command(killed), killed, env, steps)
  subprocess.run(command(killed), cwd=ROOT, env=env, check=True, capture_output=True,
                 timeout=600)
  config = tiny.get_config()
  config.method = 'memory_bank'
  config.memory_bank.num_negatives = 100
  config.num_train_steps = steps

  def restore(workdir):
    mesh = parallel.make_mesh(jax.devices()[:2])
    setup, _, _ = _setup(config, 2, config.data.synthetic_examples)
    target = step_lib.init_state(config, setup, mesh)
    return checkpoints.restore(checkpoints.create_manager(str(workdir), config), steps, target)

  straight = restore(tmp_path / 'straight')
  helpers.assert_same_state(straight, restore(killed))
  assert not finished_before_kill, 'the kill came too late to test anything'
  # The bank was trained: it is no longer the random rows it started from.
  assert np.abs(np.asarray(straight.method_state.bank)
                - np.asarray(_setup(config, 2, 256)[2].method_state.bank)).max() > 0
  result = knn.run_knn(config, str(killed))
  assert 0 <= result['knn_top1'] <= 100


@pytest.mark.slow
def test_end_to_end_crash_and_rerun_gives_the_uninterrupted_state(tmp_path, monkeypatch):
  """Dies after checkpoint 2, reruns: the uninterrupted 4-step end-to-end state, bit for bit."""
  config = run_config('end_to_end', steps=4)
  config.checkpoint_every_steps = 2
  straight = jax.device_get(pretrain.train_and_evaluate(config, str(tmp_path / 'straight')))
  resumed = helpers.crash_after_checkpoint_and_rerun(config, tmp_path / 'resumed',
                                                         monkeypatch, checkpoint=2)
  helpers.assert_same_state(straight, resumed)
  assert int(straight.step) == 4
