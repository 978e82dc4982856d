"""Memory bank (InstDisc, Wu et al. 2018; MoCo v1 Fig. 2b) with InfoNCE, as MoCo v1 compares it.

There is no key encoder: the bank holds one L2-normalised feature per training
example (random unit vectors at step 0), indexed by the example's dataset
index. A query's positive is the bank row of its own image (written when that
image was last seen, about an epoch ago), its negatives K rows drawn uniformly
at random; InfoNCE with temperature T. After the optimiser step the rows of
the global batch move towards the new queries by InstDisc's proximal rule
v <- normalize(m_b * v + (1 - m_b) * q) (m_b = 0.5), with every device's rows
written on every device (the indices and queries are all-gathered), so the
bank stays replicated and is checkpointed with the rest of the state.

The K negatives are drawn once per step and shared by every query of the
global batch (from the step's method key, equal on every device), with
replacement, as MoCo's queue is shared: the logits are then one [B, K] matmul
like MoCo's, so the two compare at equal K and equal cost, and the per-query
alternative (InstDisc's NCE draws K per query) would gather B x K x dim
floats: 8.6 GB per device at B = 256, K = 65,536. A drawn row that is the
query's own positive is masked out of that query's logits (it would be a
second copy of the positive scored as a negative), so every query sees only
other images as negatives.

The bank needs each example's dataset index: the trainer passes them in
memory, on device and streamed (`StepBatch.indices`); a caller that does not
gets an error naming them.
"""

import dataclasses
from typing import Any

import flax
import jax
import jax.numpy as jnp

from moco_jax.core import errors
from moco_jax.core import parallel
from moco_jax.methods import base
from moco_jax.methods import contrastive


@flax.struct.dataclass
class BankState:
  """The bank: bank[i] is the L2-normalised feature of training example i."""
  bank: jax.Array


def sample_negatives(rng: jax.Array, num_examples: int, count: int) -> jax.Array:
  """`count` bank rows drawn uniformly with replacement from [0, num_examples)."""
  return jax.random.randint(rng, (count,), 0, num_examples, dtype=jnp.int32)


def bank_logits(queries, bank, indices, negatives, temperature):
  """Logits [N, 1 + K]: q.bank[own index] then q.bank[negatives]^T, / T; own rows masked.

  A negative that is the query's own example gets -inf, so it counts neither
  as a negative nor as a second positive.
  """
  logits = contrastive.moco_logits(queries, bank[indices], bank[negatives], temperature)
  own = indices[:, None] == negatives[None, :]
  return logits.at[:, 1:].set(jnp.where(own, -jnp.inf, logits[:, 1:]))


def proximal_update(bank, indices, queries, momentum: float):
  """bank[i] <- normalize(m * bank[i] + (1 - m) * q) for each (i, q); the other rows unchanged."""
  rows = momentum * bank[indices] + (1.0 - momentum) * queries.astype(bank.dtype)
  return bank.at[indices].set(contrastive.l2_normalize(rows))


@dataclasses.dataclass(frozen=True)
class MemoryBank(base.Method):
  """The memory bank's static pieces.

  Attributes:
    encoder: the Flax encoder of the queries (the only network).
    temperature: T of InfoNCE.
    num_negatives: K, bank rows drawn per step.
    momentum: m_b of the proximal update.
    num_examples: rows of the bank (the train split's size); 0 when unknown
      (then only `encoder` may be used).
    embed_dim: width of the rows.
  """
  encoder: Any
  temperature: float
  num_negatives: int
  momentum: float
  num_examples: int = 0
  embed_dim: int = 0

  name = 'memory_bank'
  resume_fields = ('memory_bank.bn_mode',)

  @classmethod
  def from_config(cls, config, num_devices: int, num_examples: int = 0) -> 'MemoryBank':
    section = config.memory_bank
    return cls(encoder=contrastive.create_encoder(config.model, section.bn_mode, -1, num_devices),
               temperature=section.temperature, num_negatives=section.num_negatives,
               momentum=section.momentum, num_examples=num_examples,
               embed_dim=config.model.embed_dim)

  @classmethod
  def check_config(cls, config, num_devices: int) -> None:
    section = config.memory_bank
    contrastive.check_resnet_encoder(config)
    contrastive.check_bn_config('memory_bank', section.bn_mode, -1, config.batch_size,
                                num_devices, modes=('local', 'sync'))
    contrastive.check_temperature_and_momentum(config, 'memory_bank', 'InstDisc: 0.07',
                                               'InstDisc: 0.5')
    if not (isinstance(section.num_negatives, int) and section.num_negatives > 0):
      raise errors.ConfigError(f'config.memory_bank.num_negatives={section.num_negatives} must '
                               'be > 0 (InstDisc: 4096).')

  @staticmethod
  def describe_batch_norm(config, num_devices: int) -> str:
    if config.memory_bank.bn_mode == 'sync':
      return 'BatchNorm statistics over the global batch'
    return f'BatchNorm over each device\'s {config.batch_size // num_devices} images'

  def init_state(self, rng, params, batch_stats) -> BankState:
    """Random unit rows, one per training example."""
    del params, batch_stats
    if self.num_examples <= 0:
      raise errors.ConfigError('method=memory_bank needs the train split size for its bank: '
                               'build it with registry.create(config, devices, num_examples).')
    return BankState(bank=contrastive.init_queue(rng, self.num_examples, self.embed_dim))

  def loss(self, params, batch_stats, method_state: BankState, batch: base.StepBatch):
    """InfoNCE of this device's queries against their bank rows and K shared bank rows."""
    if batch.indices is None:
      raise errors.ConfigError(
          'method=memory_bank needs the dataset index of every example: pass them in '
          'StepBatch.indices (the sharded step always does).')
    variables = {'params': params, 'batch_stats': batch_stats}
    queries, updates = self.encoder.apply(variables, batch.query_view, train=True,
                                          mutable=['batch_stats'])
    queries = contrastive.l2_normalize(queries)
    negatives = sample_negatives(batch.rng, self.num_examples, self.num_negatives)
    bank = jax.lax.stop_gradient(method_state.bank)
    logits = bank_logits(queries, bank, batch.indices, negatives, self.temperature)
    loss, accuracy = contrastive.cross_entropy(logits, jnp.zeros_like(batch.indices))
    return loss, base.LossAux(batch_stats=updates['batch_stats'], accuracy=accuracy,
                              local=(batch.indices, jax.lax.stop_gradient(queries)))

  def update(self, params, method_state: BankState, synced, local, step) -> BankState:
    """The proximal update of the global batch's rows, on every device alike."""
    del params, synced, step
    indices, queries = (jax.lax.all_gather(x, parallel.AXIS, tiled=True) for x in local)
    return BankState(bank=proximal_update(method_state.bank, indices, queries, self.momentum))
