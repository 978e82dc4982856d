"""MoCo v1/v2 as the official `moco/builder.py`: a momentum key encoder and a queue.

`loss` is builder.py's forward: keys from the key encoder under Shuffle BN (no
gradient), queries from the trained encoder, InfoNCE over [q.k+, q.queue^T] / T
with label 0. `update` is its `_momentum_update_key_encoder` and
`_dequeue_and_enqueue` (of the keys all-gathered from every device), applied
after the optimiser step: the official code applies the same EMA at the start
of the next step, so the two agree step for step (docs/equivalence.md).
"""

import dataclasses
from typing import Any

from absl import logging
import flax
import jax

from moco_jax import models
from moco_jax.core import errors
from moco_jax.core import parallel
from moco_jax.methods import base
from moco_jax.methods import contrastive


@flax.struct.dataclass
class MocoState:
  """What MoCo carries beside the trained (query) encoder.

  Attributes:
    key_params: EMA of the query parameters (the momentum encoder); no gradient.
    key_batch_stats: BatchNorm running statistics of the key encoder.
    queue: [K, dim] L2-normalised keys of past batches, the negatives.
    queue_ptr: index of the oldest queue row (the next to be overwritten).
  """
  key_params: Any
  key_batch_stats: Any
  queue: jax.Array
  queue_ptr: jax.Array


def create_encoder(config, num_devices: int):
  """The encoder of `moco.bn_mode` (queries and keys share it; `contrastive.create_encoder`).

  local is the ablation that leaks (no shuffling of MoCo's keys).
  """
  return contrastive.create_encoder(config.model, config.moco.bn_mode, config.moco.bn_splits,
                                    num_devices)


@dataclasses.dataclass(frozen=True)
class MoCo(base.Method):
  """MoCo's static pieces.

  Attributes:
    encoder: the Flax encoder (backbone + head), used for queries and keys:
      the two differ only by their parameters.
    temperature: T of InfoNCE.
    momentum: m of the key-encoder EMA.
    shuffle_keys: Shuffle BN: permute the global key batch across devices
      before the key encoder and restore the order after.
    queue_size: K, the number of negatives.
    embed_dim: the width of the keys.
  """
  encoder: Any
  temperature: float
  momentum: float
  shuffle_keys: bool
  queue_size: int = 0
  embed_dim: int = 0

  name = 'moco'
  resume_fields = ('moco.queue_size', 'moco.bn_mode')

  @classmethod
  def from_config(cls, config, num_devices: int, num_examples: int = 0) -> 'MoCo':
    del num_examples  # MoCo keeps nothing per example.
    return cls(encoder=create_encoder(config, num_devices),
               temperature=config.moco.temperature, momentum=config.moco.momentum,
               shuffle_keys=config.moco.bn_mode == 'shuffle',
               queue_size=config.moco.queue_size, embed_dim=config.model.embed_dim)

  @classmethod
  def check_config(cls, config, num_devices: int) -> None:
    moco, batch = config.moco, config.batch_size
    contrastive.check_resnet_encoder(config)
    _require(isinstance(moco.queue_size, int) and not isinstance(moco.queue_size, bool),
             f'config.moco.queue_size={moco.queue_size!r} must be an integer (paper: 65536).')
    contrastive.check_temperature_and_momentum(config, 'moco', 'paper: 0.2', 'paper: 0.999')
    _require(moco.queue_size >= batch,
             f'config.moco.queue_size={moco.queue_size} must be >= config.batch_size={batch}: '
             'each step enqueues the whole global batch.')
    contrastive.check_bn_config('moco', moco.bn_mode, moco.bn_splits, batch, num_devices)

  @staticmethod
  def describe_batch_norm(config, num_devices: int) -> str:
    """How BatchNorm groups the batch, for the run's log (warns on groups too small)."""
    if config.moco.bn_mode == 'sync':
      return 'BatchNorm statistics over the global batch'
    groups = contrastive.bn_groups_per_device(config.moco.bn_mode, config.moco.bn_splits,
                                              num_devices)
    group = config.batch_size // num_devices // max(groups, 1)
    if group < 16:
      logging.warning('BatchNorm groups of %d images make noisy statistics: raise batch_size or '
                      'set --config.moco.bn_splits (groups per device) so that batch_size / '
                      'devices / bn_splits >= 16.', group)
    return f'{groups * num_devices} BatchNorm groups of {group} images ({config.moco.bn_mode})'

  def init_state(self, rng, params, batch_stats) -> MocoState:
    """The key encoder starts as a copy of the query encoder; the queue as random unit rows."""
    return MocoState(
        # A copy, not an alias: the two trees evolve separately from step 1.
        key_params=jax.tree.map(jax.numpy.copy, params),
        key_batch_stats=jax.tree.map(jax.numpy.copy, batch_stats),
        queue=contrastive.init_queue(rng, self.queue_size, self.embed_dim),
        queue_ptr=jax.numpy.zeros((), jax.numpy.int32))

  def loss(self, params, batch_stats, method_state: MocoState, batch: base.StepBatch):
    """InfoNCE of this device's queries against its keys and the queue.

    The keys pass through `stop_gradient`: the key encoder gets no gradient
    and only moves by the momentum update.
    """
    keys, key_batch_stats = self.keys(method_state.key_params, method_state.key_batch_stats,
                                      batch.key_view, batch.rng)
    variables = {'params': params, 'batch_stats': batch_stats}
    queries, updates = self.encoder.apply(variables, batch.query_view, train=True,
                                          mutable=['batch_stats'])
    loss, accuracy = contrastive.infonce_loss(contrastive.l2_normalize(queries), keys,
                                              method_state.queue, self.temperature)
    return loss, base.LossAux(batch_stats=updates['batch_stats'], accuracy=accuracy,
                              synced=key_batch_stats, local=keys)

  def keys(self, key_params, key_batch_stats, key_view, rng):
    """(L2-normalised keys without gradient, new key batch stats) of this device's key view."""
    keys, key_batch_stats = contrastive.encode_keys(self.encoder, key_params, key_batch_stats,
                                                    key_view, rng, self.shuffle_keys)
    return jax.lax.stop_gradient(keys), key_batch_stats

  def update(self, params, method_state: MocoState, synced, local, step) -> MocoState:
    """Momentum update of the key encoder, then the global batch of keys enqueued."""
    del step
    # The EMA uses the query after this step's update: the official code applies
    # the same update at the start of the next step.
    key_params = contrastive.momentum_update(params, method_state.key_params, self.momentum)
    queue, queue_ptr = contrastive.enqueue_global(method_state.queue, method_state.queue_ptr,
                                                  local)
    return MocoState(key_params=key_params, key_batch_stats=synced, queue=queue,
                     queue_ptr=queue_ptr)


def _require(condition: bool, message: str):
  if not condition:
    raise errors.ConfigError(message)
