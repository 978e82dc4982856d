"""One training step of any method: augment, the method's loss, the optimiser, the method's update.

The step is written for one device with `axis_name='data'` collectives and run
by `jax.shard_map` under `jax.jit` over a one-axis mesh, so the same code runs
on one GPU, eight GPUs, a TPU pod and many hosts. The method
(`moco_jax.methods`) supplies the loss and its own state's update; everything
else here is the same for every method.
"""

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moco_jax.augmentation import augment
from moco_jax.core import parallel
from moco_jax.methods import base
from moco_jax.methods import registry
from moco_jax.training import state as state_lib


@dataclasses.dataclass(frozen=True)
class StepSetup:
  """Static pieces of a train step (hashable: it is closed over, not traced)."""
  method: base.Method
  tx: optax.GradientTransformation
  aug: Any
  image_size: int
  dtype: Any
  # The batch is uint8 [B, 2, image_size, image_size, 3], both views' crops
  # cut on the host (streaming input, data.stream_crops='host'): the step
  # skips its own crop.
  host_crops: bool = False
  # The batch is uint8 [B, C, C, 3], each image in a padded canvas, with its
  # int32 [B, 2] true (height, width) beside it (streaming input,
  # data.stream_crops='device'): the step draws and cuts both crops.
  canvas: bool = False


def augment_views(state: state_lib.TrainState, images: jax.Array, setup: StepSetup,
                  sizes=None):
  """(query_view, key_view, method_rng) of this device's images at this step.

  Per-example randomness comes from the example's index in the global batch,
  so the views are the same however the batch is split across devices.
  `sizes`: int32 [local_batch, 2], the true (height, width) of each canvas
  (`setup.canvas`), else None.
  """
  aug_rng, method_rng = state_lib.step_rngs(state.rng, state.step)
  local = images.shape[0]
  example_ids = jax.lax.axis_index(parallel.AXIS) * local + jnp.arange(local)
  if setup.canvas:
    query_view, key_view = augment.two_views_from_canvas(
        aug_rng, images, sizes, example_ids, setup.aug, setup.image_size, setup.dtype)
    return query_view, key_view, method_rng
  views = augment.two_views_from_crops if setup.host_crops else augment.two_views
  query_view, key_view = views(aug_rng, images, example_ids, setup.aug, setup.image_size,
                               setup.dtype)
  return query_view, key_view, method_rng


def step_on_views(state: state_lib.TrainState, batch: base.StepBatch, setup: StepSetup):
  """The method's update from given views (call under shard_map); see `train_step`.

  Returns:
    (new_state, loss, accuracy); loss and accuracy are this device's.
  """
  method = setup.method
  grad_fn = jax.value_and_grad(method.loss, has_aux=True)
  (loss, aux), grads = grad_fn(state.params, state.batch_stats, state.method_state, batch)
  # Gradients, BatchNorm statistics and what the method syncs: one all-reduce.
  grads, batch_stats, synced = parallel.pmean_packed((grads, aux.batch_stats, aux.synced))
  updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  method_state = method.update(params, state.method_state, synced, aux.local, state.step)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, method_state=method_state)
  return new_state, loss, aux.accuracy


def train_step(state: state_lib.TrainState, images: jax.Array, setup: StepSetup,
               learning_rate_fn: Callable, indices, sizes=None):
  """One step on this device's slice of the batch (call under shard_map).

  Args:
    state: the replicated train state.
    images: uint8 [local_batch, S, S, 3] decoded images of this device (with
      `setup.host_crops`: uint8 [local_batch, 2, size, size, 3], both views' crops;
      with `setup.canvas`: uint8 [local_batch, C, C, 3], padded canvases).
    setup: static method, optimiser and hyper-parameters.
    learning_rate_fn: step -> lr, for the metrics only.
    indices: int32 [local_batch] dataset indices of the images.
    sizes: int32 [local_batch, 2] true (height, width) in each canvas (`setup.canvas`).

  Returns:
    (new_state, metrics); both identical on every device.
  """
  query_view, key_view, method_rng = augment_views(state, images, setup, sizes)
  batch = base.StepBatch(query_view, key_view, indices, method_rng)
  new_state, loss, accuracy = step_on_views(state, batch, setup)
  loss, accuracy = parallel.pmean_packed((loss, accuracy))
  metrics = {
      'train_loss': loss,
      'contrastive_acc': accuracy,
      'learning_rate': learning_rate_fn(state.step),
  }
  return new_state, metrics


def make_sharded_step(setup: StepSetup, learning_rate_fn: Callable, mesh: Mesh,
                      on_device_data: bool = False):
  """jit(shard_map(train_step)): state replicated, the batch split on 'data'.

  Called as step(state, images, indices): uint8 images [B, S, S, 3] and the
  int32 [B] dataset indices of the images, sharded like them (a method may
  keep state per example); or, with `on_device_data`, as step(state,
  dataset, indices): the whole decoded split stays on every device and the
  host sends only the int32 indices of the batch, so no image crosses the
  host-device link during training. With `setup.canvas` (streamed canvases)
  it is step(state, canvases, sizes, indices), sizes int32 [B, 2] sharded
  like the canvases.
  The state is donated: its buffers (the queue above all) are reused in place.
  """
  step = functools.partial(train_step, setup=setup, learning_rate_fn=learning_rate_fn)
  def gather_and_step(state, dataset, indices):
    return step(state, jnp.take(dataset, indices, axis=0), indices=indices)

  def step_with_indices(state, images, indices):
    return step(state, images, indices=indices)

  def step_on_canvases(state, canvases, sizes, indices):
    return step(state, canvases, indices=indices, sizes=sizes)

  if setup.canvas:
    fn, in_specs = step_on_canvases, (P(), P(parallel.AXIS), P(parallel.AXIS), P(parallel.AXIS))
  elif on_device_data:
    fn, in_specs = gather_and_step, (P(), P(), P(parallel.AXIS))
  else:
    fn, in_specs = step_with_indices, (P(), P(parallel.AXIS), P(parallel.AXIS))
  sharded = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=(P(), P()),
                          check_vma=False)
  return jax.jit(sharded, donate_argnums=(0,))


def make_step_setup(config, num_devices: int, tx, host_crops: bool = False,
                    total_steps: int = 0, num_examples: int = 0,
                    canvas: bool = False) -> StepSetup:
  """The static pieces of the step `config` describes on `num_devices` devices.

  `host_crops` / `canvas`: the streamed input's two forms (`StepSetup`).

  `total_steps` (0: unknown) reaches methods whose schedules span the run;
  `num_examples` is the train split's size (a memory bank has a row per example).
  """
  method = registry.create(config, num_devices, num_examples).with_total_steps(total_steps)
  return StepSetup(method=method, tx=tx, aug=config.aug,
                   image_size=config.data.image_size, dtype=jnp.dtype(config.model.dtype),
                   host_crops=host_crops, canvas=canvas)


def init_state(config, setup: StepSetup, mesh: Mesh) -> state_lib.TrainState:
  """The initial TrainState, built by one jit-compiled program, replicated on `mesh`.

  Compiling the initialisation (rather than running it op by op) is much
  faster for big models, and `out_shardings` places the result on every
  device of every host directly.
  """
  create = functools.partial(state_lib.create_train_state, method=setup.method, tx=setup.tx,
                             image_size=config.data.image_size,
                             channels=int(config.data.get('channels', 3)))
  if setup.dtype == jnp.float64:  # Numerical checks: the whole state in float64 (x64 enabled).
    create = _in_float64(create)
  return jax.jit(create, out_shardings=NamedSharding(mesh, P()))(
      jax.random.PRNGKey(config.seed))


def _in_float64(create: Callable) -> Callable:
  """`create` with every floating leaf of the state it returns cast to float64.

  With `model.dtype='float64'` the network computes in float64, but Flax and
  optax initialise in float32; casting the parameters, statistics, optimiser
  and method state too leaves no float32 rounding anywhere, so two runs that
  differ only in summation order (1 vs 8 devices, 1 vs 2 processes) differ by
  float64 rounding alone (tests/rounding.py).
  """
  def create64(rng):
    return jax.tree.map(
        lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        create(rng))
  return create64
