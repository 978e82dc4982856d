"""The MoCo algorithm in one place, as the official `moco/builder.py`.

What a reader looks for when they open MoCo: the L2-normalised query and key
embeddings, the logits [q.k+, q.queue^T] / T and InfoNCE, the FIFO queue of
negatives (created and enqueued), the key encoder run under Shuffle BN, and
the momentum (EMA) update of the key encoder. Everything here is written for
one device with `'data'` collectives (`moco_jax.core.parallel.AXIS`); the loop,
the optimiser and the data live elsewhere.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from moco_jax.core import parallel


@dataclasses.dataclass(frozen=True)
class MoCo:
  """Static pieces of the algorithm (hashable: closed over, never traced).

  Attributes:
    encoder: the Flax encoder (backbone + head), used for queries and keys:
      the two differ only by their parameters.
    temperature: T of InfoNCE.
    momentum: m of the key-encoder EMA.
    shuffle_keys: Shuffle BN: permute the global key batch across devices
      before the key encoder and restore the order after.
  """
  encoder: Any
  temperature: float
  momentum: float
  shuffle_keys: bool


class MocoAux(NamedTuple):
  """What `moco_loss` returns beside the loss."""
  keys: jax.Array  # [local_batch, dim] L2-normalised, no gradient.
  query_batch_stats: Any
  key_batch_stats: Any
  accuracy: jax.Array


# --------------------------------------------------------------------------
# Embeddings, logits and InfoNCE.


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / ||x||, as torch.nn.functional.normalize (eps guards the zero vector)."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # float64 stays float64.
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


def moco_logits(queries: jax.Array, keys: jax.Array, queue: jax.Array,
                temperature: float) -> jax.Array:
  """Logits [N, 1 + K]: column 0 is q.k+, the rest q.queue^T, all divided by T.

  Computed in float32 whatever the network's dtype: with T = 0.07 and K = 65536
  bfloat16 logits would lose the small differences the loss is made of.
  """
  dtype = jnp.promote_types(queries.dtype, jnp.float32)  # float64 stays float64.
  queries = queries.astype(dtype)
  positive = jnp.sum(queries * keys.astype(dtype), axis=-1, keepdims=True)
  negative = jnp.dot(queries, queue.astype(dtype).T,
                     precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([positive, negative], axis=1) / temperature


def infonce_loss(queries, keys, queue, temperature):
  """Mean InfoNCE: cross-entropy with label 0 over `moco_logits`.

  Returns:
    (loss, accuracy), accuracy being the fraction of queries whose positive key
    scores above every negative (a cheap health signal: it rises from ~0).
  """
  logits = moco_logits(queries, keys, queue, temperature)
  loss = jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[:, 0])
  accuracy = jnp.mean(jnp.argmax(logits, axis=1) == 0)
  return loss, accuracy


# --------------------------------------------------------------------------
# The queue of negatives.


def init_queue(rng: jax.Array, size: int, dim: int) -> jax.Array:
  """Random unit rows, as the official code (randn normalised along dim)."""
  return l2_normalize(jax.random.normal(rng, (size, dim), jnp.float32))


def enqueue(queue: jax.Array, pointer: jax.Array, keys: jax.Array):
  """Writes `keys` over the oldest entries of the FIFO `queue`, wrapping around.

  Any K >= len(keys) works (the official code asserts K % batch == 0): row i of
  `keys` goes to slot (pointer + i) mod K, and the pointer advances by len(keys).

  Returns:
    (new_queue, new_pointer).
  """
  size = queue.shape[0]
  count = keys.shape[0]
  slots = (pointer + jnp.arange(count)) % size
  queue = queue.at[slots].set(keys.astype(queue.dtype), unique_indices=True)
  return queue, (pointer + count) % size


def enqueue_global(queue: jax.Array, pointer: jax.Array, local_keys: jax.Array):
  """Every device enqueues the same all-gathered global batch of keys, in device order."""
  return enqueue(queue, pointer, jax.lax.all_gather(local_keys, parallel.AXIS, tiled=True))


# --------------------------------------------------------------------------
# Shuffle BN and the key encoder.


def bn_groups_per_device(bn_mode: str, bn_splits: int, num_devices: int) -> int:
  """BatchNorm groups per device: `bn_splits`, or 8 groups in total if -1.

  Only Shuffle BN splits the batch (on one GPU the official CIFAR demo uses 8
  groups to emulate 8 GPUs); sync and local modes use one group.
  """
  if bn_mode != 'shuffle':
    return 1
  if bn_splits > 0:
    return bn_splits
  return max(1, 8 // num_devices)


def encode_keys(moco: MoCo, key_params, key_batch_stats, images, rng):
  """Runs the key encoder; with Shuffle BN, on a permutation of the global batch.

  Every device draws the same permutation of the all-gathered batch, encodes
  its slice of it, and then takes back, from the all-gathered outputs, the rows
  of its own examples: BatchNorm groups then mix examples of other devices, so
  a query cannot find its positive key from shared batch statistics.

  Returns:
    (L2-normalised keys [local, dim], updated key batch stats).
  """
  axis = parallel.AXIS
  variables = {'params': key_params, 'batch_stats': key_batch_stats}
  local = images.shape[0]
  if moco.shuffle_keys:
    device = jax.lax.axis_index(axis)
    everyone = jax.lax.all_gather(images, axis, tiled=True)
    perm = jax.random.permutation(rng, everyone.shape[0])
    mine = jax.lax.dynamic_slice_in_dim(everyone[perm], device * local, local)
    keys, updates = moco.encoder.apply(variables, mine, train=True, mutable=['batch_stats'])
    all_keys = jax.lax.all_gather(keys, axis, tiled=True)
    unshuffled = all_keys[jnp.argsort(perm)]
    keys = jax.lax.dynamic_slice_in_dim(unshuffled, device * local, local)
  else:
    keys, updates = moco.encoder.apply(variables, images, train=True, mutable=['batch_stats'])
  return l2_normalize(keys), updates['batch_stats']


def moco_loss(query_params, key_params, state, query_view, key_view, shuffle_rng, moco: MoCo):
  """InfoNCE of this device's queries against its keys and the queue.

  Both parameter trees are arguments so that tests can differentiate with
  respect to each: the keys pass through `stop_gradient`, so the key encoder
  gets no gradient and only moves by the momentum update.

  Args:
    state: the TrainState (its batch stats and queue are read).

  Returns:
    (loss, MocoAux).
  """
  keys, key_batch_stats = encode_keys(moco, key_params, state.key_batch_stats, key_view,
                                      shuffle_rng)
  keys = jax.lax.stop_gradient(keys)
  variables = {'params': query_params, 'batch_stats': state.query_batch_stats}
  queries, updates = moco.encoder.apply(variables, query_view, train=True,
                                        mutable=['batch_stats'])
  loss, accuracy = infonce_loss(l2_normalize(queries), keys, state.queue, moco.temperature)
  return loss, MocoAux(keys, updates['batch_stats'], key_batch_stats, accuracy)


def momentum_update(query_params, key_params, momentum: float):
  """key <- m * key + (1 - m) * query (no gradient, no weight decay)."""
  return optax.incremental_update(query_params, key_params, 1.0 - momentum)
