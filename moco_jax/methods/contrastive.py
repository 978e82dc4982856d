"""The pieces contrastive methods share: embeddings, InfoNCE, the queue, Shuffle BN, EMA.

The L2-normalised embeddings, the logits [q.k+, q.negatives^T] / T and
InfoNCE as cross-entropy, the in-batch logits and labels of the global batch,
the FIFO queue of negatives (created and enqueued with the all-gathered keys),
the encoder of a BatchNorm mode and its checks, an encoder run under Shuffle
BN, and the momentum (EMA) update. MoCo (`methods/moco.py`), end-to-end
(`methods/end_to_end.py`) and the memory bank (`methods/memory_bank.py`) are
made of them. Everything here is written for one device with `'data'`
collectives (`moco_jax.core.parallel.AXIS`).
"""

import jax
import jax.numpy as jnp
import optax

from moco_jax import models
from moco_jax.models import checks as model_checks
from moco_jax.core import checks
from moco_jax.core import errors
from moco_jax.core import parallel


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


def cross_entropy(logits: jax.Array, labels: jax.Array):
  """(mean cross-entropy, accuracy) of float32 `logits` [N, C] against int `labels` [N].

  InfoNCE is this with the positive's column as the label; accuracy is the
  fraction of rows whose positive scores above every negative (a cheap health
  signal: it rises from ~0).
  """
  positive = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
  loss = jnp.mean(jax.nn.logsumexp(logits, axis=1) - positive)
  accuracy = jnp.mean((jnp.argmax(logits, axis=1) == labels).astype(logits.dtype))
  return loss, accuracy


def infonce_loss(queries, keys, queue, temperature):
  """Mean InfoNCE over `moco_logits`: cross-entropy with label 0.

  Returns:
    (loss, accuracy), see `cross_entropy`.
  """
  logits = moco_logits(queries, keys, queue, temperature)
  # `cross_entropy` with labels 0, written with a slice: the positive is column 0.
  loss = jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[:, 0])
  return loss, jnp.mean((jnp.argmax(logits, axis=1) == 0).astype(logits.dtype))


def global_labels(local: int) -> jax.Array:
  """Index of each of this device's `local` examples in the all-gathered global batch."""
  return jax.lax.axis_index(parallel.AXIS) * local + jnp.arange(local)


def in_batch_logits(queries: jax.Array, local_keys: jax.Array, temperature: float):
  """(logits [local, global], labels [local]): every query against every key of the global batch.

  The keys are all-gathered across devices (and processes): JAX transposes
  `all_gather` into `psum_scatter`, which sums every device's cotangents back
  onto the device that computed the key, so the keys' encoder gets the
  gradient of every device's queries (tests/test_mechanisms.py checks it
  against one device). The label of a query is its own key's global index.
  """
  keys = jax.lax.all_gather(local_keys, parallel.AXIS, tiled=True)
  dtype = jnp.promote_types(queries.dtype, jnp.float32)  # float64 stays float64.
  logits = jnp.dot(queries.astype(dtype), keys.astype(dtype).T,
                   precision=jax.lax.Precision.HIGHEST) / temperature
  return logits, global_labels(queries.shape[0])


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
# BatchNorm modes, Shuffle BN and the key encoder.


BN_MODES = ('shuffle', 'sync', 'local')


def create_encoder(model_config, bn_mode: str, bn_splits: int, num_devices: int):
  """The encoder of `bn_mode` (a method's queries and keys share it; only params may differ).

  shuffle: per-device statistics in `bn_splits` groups, keys shuffled across
    devices (the paper's Shuffle BN; on one device the groups do the job).
  sync: statistics over the global batch.
  local: per-device statistics, no shuffling.
  """
  if bn_mode == 'sync':
    return models.create_encoder(model_config, bn_axis_name=parallel.AXIS)
  return models.create_encoder(model_config,
                               bn_splits=bn_groups_per_device(bn_mode, bn_splits, num_devices))


def check_resnet_encoder(config):
  """The methods built on `create_encoder` (ResNet + projection head) refuse a ViT name."""
  model_checks.check_resnet(config.model, config.method)


def check_temperature_and_momentum(config, section: str, temperature_hint: str,
                                   momentum_hint: str = ''):
  """ConfigError unless config.<section>.temperature > 0 and (if it has one) momentum in [0, 1).

  The hints say the published values, e.g. 'paper: 0.2'.
  """
  checks.check(config, f'{section}.temperature', lambda v: checks.number(v) and v > 0,
               'must be > 0', temperature_hint)
  if momentum_hint:
    checks.check(config, f'{section}.momentum', lambda v: checks.number(v) and 0 <= v < 1,
                 'must be in [0, 1)', momentum_hint)


def check_bn_config(section: str, bn_mode: str, bn_splits: int, batch: int, num_devices: int,
                    modes=BN_MODES):
  """ConfigError unless `config.<section>.bn_mode` is one of `modes` and its groups divide the batch."""
  if not (isinstance(bn_mode, str) and bn_mode in modes):
    raise errors.ConfigError(f'config.{section}.bn_mode={bn_mode!r} is not one of {list(modes)}.')
  if not (checks.integer(bn_splits) and (bn_splits == -1 or bn_splits > 0)):
    raise errors.ConfigError(
        f'config.{section}.bn_splits={bn_splits!r} must be -1 (8 groups) or > 0.')
  splits = bn_groups_per_device(bn_mode, bn_splits, num_devices)
  local = batch // num_devices
  if local % splits:
    raise errors.ConfigError(
        f'config.{section}.bn_splits={bn_splits} ({splits} BatchNorm groups per device) does '
        f'not divide the per-device batch {local} (batch_size / devices): set '
        f'--config.{section}.bn_splits to a divisor of it.')


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


def encode_keys(encoder, key_params, key_batch_stats, images, rng, shuffle: bool):
  """Runs the key encoder; with Shuffle BN (`shuffle`), on a permutation of the global batch.

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
  if shuffle:
    device = jax.lax.axis_index(axis)
    everyone = jax.lax.all_gather(images, axis, tiled=True)
    perm = jax.random.permutation(rng, everyone.shape[0])
    mine = jax.lax.dynamic_slice_in_dim(everyone[perm], device * local, local)
    keys, updates = encoder.apply(variables, mine, train=True, mutable=['batch_stats'])
    all_keys = jax.lax.all_gather(keys, axis, tiled=True)
    unshuffled = all_keys[jnp.argsort(perm)]
    keys = jax.lax.dynamic_slice_in_dim(unshuffled, device * local, local)
  else:
    keys, updates = encoder.apply(variables, images, train=True, mutable=['batch_stats'])
  return l2_normalize(keys), updates['batch_stats']


def momentum_update(query_params, key_params, momentum: float):
  """key <- m * key + (1 - m) * query (no gradient, no weight decay)."""
  return optax.incremental_update(query_params, key_params, 1.0 - momentum)
