"""The method seam: what a self-supervised method tells the one training loop.

The loop (`moco_jax.training`) owns everything a method does not: the two
augmented views, the optimiser step on the trained encoder, the all-reduce of
gradients and BatchNorm statistics, checkpoints, metrics and evaluation. A
method owns its loss on the two views and whatever it carries beside the
trained encoder (MoCo: the momentum encoder and the queue; a memory bank: the
bank), created by `init_state` and advanced by `update` after each optimiser
step. It is reached only through `moco_jax.methods.registry`, chosen by
`config.method`.

A new method is one file in this folder: a `Method` subclass and one line in
the registry (docs/architecture.md, "Adding a method", shows a whole one).
"""

import abc
from typing import Any, ClassVar, NamedTuple, Optional

import jax


class StepBatch(NamedTuple):
  """This device's inputs of one step, as the loop hands them to a method.

  Attributes:
    query_view: the first augmented view [local_batch, S, S, 3] (normalised).
    key_view: the second view of the same images, same shape.
    indices: int32 [local_batch] dataset index of each example (the same image
      has the same index in every epoch), for methods that keep per-example
      state (the memory bank); the trainer passes them on every input path,
      None only where a caller of the step does not.
    rng: this step's key for the method's own randomness (Shuffle BN's
      permutation, a bank's negative sampling); equal on every device.
  """
  query_view: jax.Array
  key_view: jax.Array
  indices: Optional[jax.Array]
  rng: jax.Array


class LossAux(NamedTuple):
  """What a method's loss returns beside the scalar loss.

  Attributes:
    batch_stats: the trained encoder's new BatchNorm statistics (this device's;
      the loop averages them over devices with the gradients).
    accuracy: fraction of queries whose positive scores highest (a health
      signal logged as `contrastive_acc`).
    synced: a pytree the loop averages over devices in the same all-reduce as
      the gradients before `update` sees it (MoCo: the key encoder's BatchNorm
      statistics); () when there is none.
    local: a pytree `update` gets as it is (this device's values; MoCo: its
      keys, which it all-gathers itself); () when there is none.
  """
  batch_stats: Any
  accuracy: jax.Array
  synced: Any = ()
  local: Any = ()


class Method(abc.ABC):
  """One self-supervised method. Instances are static: closed over, never traced.

  Subclasses are frozen dataclasses (hashable, compared by value) with an
  `encoder` field: the Flax module whose params the loop trains (every
  evaluation reads `params['backbone']`). They set `name` and implement
  `from_config`, `init_state`, `loss` and `update`.
  All three are written for one device with `'data'` collectives, as the step.
  """

  name: ClassVar[str]
  # Config fields (dotted) whose change makes a checkpoint of this method mean
  # something else: a resume that changes one is refused (`run.guard`).
  resume_fields: ClassVar[tuple[str, ...]] = ()

  @classmethod
  @abc.abstractmethod
  def from_config(cls, config, num_devices: int, num_examples: int = 0) -> 'Method':
    """The method `config` describes on `num_devices` devices (builds its encoder).

    Args:
      config: the run's config.
      num_devices: devices of the mesh.
      num_examples: size of the train split, for methods that keep state per
        example (a memory bank); 0 where it is not known (evaluations only need
        the encoder).
    """

  @classmethod
  def check_config(cls, config, num_devices: int) -> None:
    """Raises errors.ConfigError for a value of this method's config section that cannot work."""
    del config, num_devices

  @staticmethod
  def describe_batch_norm(config, num_devices: int) -> str:
    """How BatchNorm statistics are taken, for the run's log."""
    del num_devices
    return f'BatchNorm over each device\'s {config.batch_size} / devices images'

  def with_total_steps(self, total_steps: int) -> 'Method':
    """This method for a run of `total_steps` steps (for schedules over the run; MoCo v3's momentum)."""
    del total_steps
    return self

  @abc.abstractmethod
  def init_state(self, rng: jax.Array, params, batch_stats) -> Any:
    """The method's state at step 0 (a pytree; () when it keeps none).

    Args:
      rng: a key of its own (the loop's split of the run's seed).
      params, batch_stats: the trained encoder at step 0 (e.g. to copy into a
        momentum encoder).
    """

  @abc.abstractmethod
  def loss(self, params, batch_stats, method_state, batch: StepBatch):
    """(scalar loss, LossAux) of this device's batch; differentiated w.r.t. `params`."""

  def update(self, params, method_state, synced, local, step: jax.Array):
    """The method's state after the optimiser step (`params` are already updated).

    Args:
      params: the trained encoder's params after this step's update.
      method_state: the state the loss saw.
      synced: `LossAux.synced`, averaged over devices.
      local: `LossAux.local`, this device's.
      step: the step just taken (0-based).
    """
    del params, synced, local, step
    return method_state
