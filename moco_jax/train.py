"""MoCo v2 pretraining: the per-device step, its sharded wrapper and the loop.

The step is written for one device with `axis_name='data'` collectives and run
by `jax.shard_map` under `jax.jit` over a one-axis mesh, so the same code runs
on one GPU, eight GPUs, a TPU pod and many hosts.
"""

import dataclasses
import functools
import math
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moco_jax import augment
from moco_jax import checkpoints
from moco_jax import config_checks
from moco_jax import input_pipeline
from moco_jax import knn
from moco_jax import losses
from moco_jax import metrics_writer
from moco_jax import models
from moco_jax import state as state_lib

AXIS = 'data'


@dataclasses.dataclass(frozen=True)
class StepSetup:
  """Static pieces of a train step (hashable: it is closed over, not traced)."""
  query_encoder: Any
  key_encoder: Any
  tx: optax.GradientTransformation
  aug: Any
  image_size: int
  dtype: Any
  temperature: float
  momentum: float
  shuffle_keys: bool


bn_splits_per_device = config_checks.bn_splits_per_device


def create_encoders(config, num_devices: int):
  """(query_encoder, key_encoder) for `moco.bn_mode`.

  shuffle: per-device statistics in `bn_splits` groups, keys shuffled across
    devices (the paper's Shuffle BN; on one device the groups do the job).
  sync: statistics over the global batch for both encoders.
  local: per-device statistics, no shuffling (the ablation that leaks).
  """
  mode = config.moco.bn_mode
  if mode == 'sync':
    encoder = models.create_encoder(config.model, bn_axis_name=AXIS)
    return encoder, encoder
  splits = bn_splits_per_device(config, num_devices)
  encoder = models.create_encoder(config.model, bn_splits=splits)
  return encoder, encoder


def create_learning_rate_fn(config, steps_per_epoch: int, total_steps: int) -> Callable:
  """Per-step lr: base_lr x batch / 256, optional warm-up, then cosine/step/constant."""
  peak = config.optim.base_lr * config.batch_size / 256
  warmup = int(round(config.optim.warmup_epochs * steps_per_epoch))
  main_steps = max(total_steps - warmup, 1)
  if config.optim.schedule == 'cosine':
    main = optax.cosine_decay_schedule(peak, main_steps)
  elif config.optim.schedule == 'step':
    boundaries = {int(e * steps_per_epoch) - warmup: 0.1 for e in config.optim.step_epochs}
    main = optax.piecewise_constant_schedule(peak, boundaries)
  else:
    main = optax.constant_schedule(peak)
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def create_optimizer(config, learning_rate_fn) -> optax.GradientTransformation:
  """torch.optim.SGD semantics: decay is added to the gradient before momentum."""
  return optax.chain(
      optax.add_decayed_weights(config.optim.weight_decay),
      optax.sgd(learning_rate_fn, momentum=config.optim.momentum))


def encode_keys(setup: StepSetup, key_params, key_batch_stats, images, rng):
  """Runs the key encoder; with Shuffle BN, on a permutation of the global batch.

  Every device draws the same permutation of the all-gathered batch, encodes
  its slice of it, and then takes back, from the all-gathered outputs, the rows
  of its own examples: BatchNorm groups then mix examples of other devices, so
  a query cannot find its positive key from shared batch statistics.
  """
  variables = {'params': key_params, 'batch_stats': key_batch_stats}
  local = images.shape[0]
  if setup.shuffle_keys:
    device = jax.lax.axis_index(AXIS)
    everyone = jax.lax.all_gather(images, AXIS, tiled=True)
    perm = jax.random.permutation(rng, everyone.shape[0])
    mine = jax.lax.dynamic_slice_in_dim(everyone[perm], device * local, local)
    keys, updates = setup.key_encoder.apply(variables, mine, train=True, mutable=['batch_stats'])
    all_keys = jax.lax.all_gather(keys, AXIS, tiled=True)
    unshuffled = all_keys[jnp.argsort(perm)]
    keys = jax.lax.dynamic_slice_in_dim(unshuffled, device * local, local)
  else:
    keys, updates = setup.key_encoder.apply(variables, images, train=True,
                                            mutable=['batch_stats'])
  return losses.l2_normalize(keys), updates['batch_stats']


def moco_loss(query_params, key_params, state: state_lib.TrainState, query_view, key_view,
              shuffle_rng, setup: StepSetup):
  """InfoNCE of this device's queries against its keys and the queue.

  Both parameter trees are arguments so that tests can differentiate with
  respect to each: the keys pass through `stop_gradient`, so the key encoder
  gets no gradient and only moves by the momentum update.

  Returns:
    (loss, (keys, query_batch_stats, key_batch_stats, accuracy)).
  """
  keys, key_batch_stats = encode_keys(setup, key_params, state.key_batch_stats, key_view,
                                       shuffle_rng)
  keys = jax.lax.stop_gradient(keys)
  variables = {'params': query_params, 'batch_stats': state.query_batch_stats}
  queries, updates = setup.query_encoder.apply(variables, query_view, train=True,
                                               mutable=['batch_stats'])
  loss, accuracy = losses.infonce_loss(losses.l2_normalize(queries), keys, state.queue,
                                       setup.temperature)
  return loss, (keys, updates['batch_stats'], key_batch_stats, accuracy)


def augment_views(state: state_lib.TrainState, images: jax.Array, setup: StepSetup):
  """(query_view, key_view, shuffle_rng) of this device's images at this step.

  Per-example randomness comes from the example's index in the global batch,
  so the views are the same however the batch is split across devices.
  """
  step_rng = jax.random.fold_in(state.rng, state.step)
  aug_rng, shuffle_rng = jax.random.split(step_rng)
  local = images.shape[0]
  example_ids = jax.lax.axis_index(AXIS) * local + jnp.arange(local)
  query_view, key_view = augment.two_views(aug_rng, images, example_ids, setup.aug,
                                           setup.image_size, setup.dtype)
  return query_view, key_view, shuffle_rng


def train_step(state: state_lib.TrainState, images: jax.Array, setup: StepSetup,
               learning_rate_fn: Callable):
  """One MoCo step on this device's slice of the batch (call under shard_map).

  Args:
    state: the replicated train state.
    images: uint8 [local_batch, S, S, 3] decoded images of this device.
    setup: static encoders, optimiser and hyper-parameters.
    learning_rate_fn: step -> lr, for the metrics only.

  Returns:
    (new_state, metrics); both identical on every device.
  """
  query_view, key_view, shuffle_rng = augment_views(state, images, setup)
  grad_fn = jax.value_and_grad(moco_loss, has_aux=True)
  (loss, (keys, query_batch_stats, key_batch_stats, accuracy)), grads = grad_fn(
      state.query_params, state.key_params, state, query_view, key_view, shuffle_rng, setup)
  grads = jax.lax.pmean(grads, AXIS)
  updates, opt_state = setup.tx.update(grads, state.opt_state, state.query_params)
  query_params = optax.apply_updates(state.query_params, updates)
  # key <- m * key + (1 - m) * query, with the query after this step's update:
  # the official code applies the same update at the start of the next step.
  key_params = optax.incremental_update(query_params, state.key_params, 1.0 - setup.momentum)

  # Every device enqueues the same global batch of keys, in device order.
  all_keys = jax.lax.all_gather(keys, AXIS, tiled=True)
  queue, queue_ptr = losses.enqueue(state.queue, state.queue_ptr, all_keys)

  new_state = state.replace(
      step=state.step + 1,
      query_params=query_params,
      query_batch_stats=jax.lax.pmean(query_batch_stats, AXIS),
      key_params=key_params,
      key_batch_stats=jax.lax.pmean(key_batch_stats, AXIS),
      opt_state=opt_state,
      queue=queue,
      queue_ptr=queue_ptr,
  )
  metrics = {
      'train_loss': jax.lax.pmean(loss, AXIS),
      'contrastive_acc': jax.lax.pmean(accuracy, AXIS),
      'learning_rate': learning_rate_fn(state.step),
  }
  return new_state, metrics


def make_mesh(devices=None) -> Mesh:
  """A one-axis ('data',) mesh over all (global) devices."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (AXIS,))


def make_sharded_step(setup: StepSetup, learning_rate_fn: Callable, mesh: Mesh,
                      on_device_data: bool = False):
  """jit(shard_map(train_step)): state replicated, the batch split on 'data'.

  Called as step(state, images) with uint8 images [B, S, S, 3], or, with
  `on_device_data`, as step(state, dataset, indices): the whole decoded split
  stays on every device and the host sends only the int32 indices of the
  batch, so no image crosses the host-device link during training.
  The state is donated: its buffers (the queue above all) are reused in place.
  """
  step = functools.partial(train_step, setup=setup, learning_rate_fn=learning_rate_fn)
  def gather_and_step(state, dataset, indices):
    return step(state, jnp.take(dataset, indices, axis=0))

  fn, in_specs = ((gather_and_step, (P(), P(), P(AXIS))) if on_device_data
                  else (step, (P(), P(AXIS))))
  sharded = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=(P(), P()),
                          check_vma=False)
  return jax.jit(sharded, donate_argnums=(0,))


def make_step_setup(config, num_devices: int, tx) -> StepSetup:
  query_encoder, key_encoder = create_encoders(config, num_devices)
  return StepSetup(
      query_encoder=query_encoder, key_encoder=key_encoder, tx=tx, aug=config.aug,
      image_size=config.data.image_size, dtype=jnp.dtype(config.model.dtype),
      temperature=config.moco.temperature, momentum=config.moco.momentum,
      shuffle_keys=config.moco.bn_mode == 'shuffle')


def init_state(config, setup: StepSetup, mesh: Mesh) -> state_lib.TrainState:
  """The initial TrainState, built by one jit-compiled program, replicated on `mesh`.

  Compiling the initialisation (rather than running it op by op) is much
  faster for big models, and `out_shardings` places the result on every
  device of every host directly.
  """
  create = functools.partial(
      state_lib.create_train_state, encoder=setup.query_encoder, tx=setup.tx,
      image_size=config.data.image_size, queue_size=config.moco.queue_size,
      embed_dim=config.model.embed_dim)
  return jax.jit(create, out_shardings=NamedSharding(mesh, P()))(
      jax.random.PRNGKey(config.seed))


def replicate(tree, mesh: Mesh):
  """Places a host pytree on every device of `mesh` (works across hosts)."""
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: jax.make_array_from_callback(
      np.shape(x), sharding, lambda idx: np.asarray(x)[idx]), jax.device_get(tree))


def shard_batch(local_images: np.ndarray, mesh: Mesh) -> jax.Array:
  """A global array split on 'data' from this process's slice of the batch."""
  sharding = NamedSharding(mesh, P(AXIS))
  return jax.make_array_from_process_local_data(sharding, local_images)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Pretrains MoCo as `config` says, in `workdir`, resuming from its checkpoints.

  Returns:
    The final TrainState (replicated on the mesh).
  """
  num_devices = jax.device_count()
  config_checks.validate(config, num_devices=num_devices, process_count=jax.process_count())
  writer = metrics_writer.MetricsWriter(workdir, config, enabled=jax.process_index() == 0)
  mesh = make_mesh()

  train_ds = input_pipeline.load_split(config.data, 'train')
  steps_per_epoch = len(train_ds) // config.batch_size
  config_checks.check_dataset(config, len(train_ds))
  total_steps = (config.num_train_steps if config.num_train_steps > 0
                 else config.num_epochs * steps_per_epoch)
  learning_rate_fn = create_learning_rate_fn(config, steps_per_epoch, total_steps)
  tx = create_optimizer(config, learning_rate_fn)
  setup = make_step_setup(config, num_devices, tx)

  state = init_state(config, setup, mesh)
  manager = checkpoints.create_manager(workdir, config)
  state = checkpoints.restore_latest(manager, state)
  start_step = int(jax.device_get(state.step))
  if start_step:
    logging.info('Resuming from step %d (checkpoint in %s).', start_step, manager.directory)

  p_step = make_sharded_step(setup, learning_rate_fn, mesh, config.data.on_device)
  next_batch = _batch_feeder(config, train_ds, mesh, start_step)
  hooks = _eval_hooks(config, workdir, mesh, setup, steps_per_epoch, total_steps, writer)

  preemption = checkpoints.PreemptionWatcher()
  progress = metrics_writer.Progress(total_steps, start_step, config.batch_size, steps_per_epoch)
  try:
    pending = []
    for step in range(start_step, total_steps):
      state, metrics = p_step(state, *next_batch(step))
      pending.append(metrics)
      done = step + 1
      if step == start_step:
        # Compilation is not throughput: time the run from the end of its first step.
        jax.block_until_ready(metrics)
        logging.info('First step (with compilation) took %.1f s.', progress.elapsed())
        progress.restart(done)
      if done % config.log_every_steps == 0 or done == total_steps:
        summary = metrics_writer.average(jax.device_get(pending))
        pending = []
        if not math.isfinite(summary['train_loss']):
          raise FloatingPointError(f'train_loss is {summary["train_loss"]} at step {done}: lower '
                                   'optim.base_lr or check the data.')
        writer.write(done, {**summary, **progress.update(done)})
      if done % config.checkpoint_every_steps == 0 or done == total_steps:
        checkpoints.save(manager, done, state)
      elif preemption.requested(manager, done):
        logging.warning('Preempted (SIGTERM): saving step %d and stopping; rerun the same '
                        'command to continue.', done)
        checkpoints.save(manager, done, state)
        break
      for hook in hooks:
        hook(done, state)
  finally:
    preemption.uninstall()
  manager.wait_until_finished()
  writer.close()
  return state


def _batch_feeder(config, train_ds, mesh: Mesh, start_step: int) -> Callable:
  """step -> the arguments after `state` of the sharded step, for that step.

  Either a sharded uint8 batch from the host pipeline, or (with
  `data.on_device`) the device-resident split and the batch's indices. Both
  read the same examples at the same step: `input_pipeline.train_indices`.
  """
  process, processes = jax.process_index(), jax.process_count()
  if config.data.on_device:
    dataset = replicate(train_ds.images, mesh)
    local = config.batch_size // processes

    def indices(step):
      idx = input_pipeline.train_indices(len(train_ds), config.batch_size, config.seed, step)
      return dataset, shard_batch(idx[process * local:(process + 1) * local].astype(np.int32),
                                  mesh)
    return indices

  batches = input_pipeline.train_batches(
      train_ds, global_batch=config.batch_size, seed=config.seed, start_step=start_step,
      process_index=process, process_count=processes)
  return lambda step: (shard_batch(next(batches)['image'], mesh),)


def _eval_hooks(config, workdir, mesh, setup, steps_per_epoch, total_steps, writer):
  """Evaluations run during pretraining: the kNN monitor (config.eval.knn_every_epochs)."""
  return knn.make_monitor_hooks(config, workdir, mesh, setup, steps_per_epoch, total_steps,
                                writer)
