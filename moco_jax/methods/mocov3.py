"""MoCo v3 as the official moco-v3 `moco/builder.py`: no queue, a predictor, a symmetric loss.

`loss` is builder.py's forward, in its order: the momentum encoder is first
moved towards the current (pre-update) encoder with this step's momentum
m = 1 - (1 - m0)(1 + cos(pi step / total)) / 2 (main_moco.py's
`adjust_moco_momentum`, epoch / epochs = step / total), then both views go
through both encoders, each as its own batch (its own BatchNorm statistics,
as the two separate torch calls), and the loss is ctr(q1, k2) + ctr(q2, k1):
cross-entropy of q against the keys all-gathered from every device, labels
arange(n) + n x rank, scaled by 2T. The predictor is on the query side only.
BatchNorm is synchronised over devices (main_moco.py converts to SyncBN).
`update` stores the momentum encoder the loss made: nothing changes after the
optimiser step, so the next step sees exactly what torch's would.
"""

import dataclasses
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp

from moco_jax import models
from moco_jax.core import errors
from moco_jax.core import parallel
from moco_jax.methods import base
from moco_jax.methods import contrastive


@flax.struct.dataclass
class MoCoV3State:
  """What MoCo v3 carries beside the trained encoder.

  Attributes:
    key_params: the momentum encoder (backbone + projector, no predictor).
    key_batch_stats: its BatchNorm running statistics (unused by the loss,
      kept as torch keeps its buffers).
    step: steps taken, for the momentum schedule (the loss does not see the
      loop's step).
  """
  key_params: Any
  key_batch_stats: Any
  step: jax.Array


def momentum_at(step, total_steps: int, base_momentum: float, cosine: bool,
                dtype=jnp.float32):
  """m of step `step`: m0, or with `cosine` 1 - (1 - m0)(1 + cos(pi step / total)) / 2.

  In `dtype`: the parameters' (float64 in a float64 run, where a float32 m would
  round every key-encoder update to float32's precision).
  """
  if not cosine or total_steps <= 0:
    return jnp.asarray(base_momentum, dtype)
  progress = jnp.asarray(step, dtype) / total_steps
  return (1.0 - (1.0 - base_momentum) * (1.0 + jnp.cos(math.pi * progress)) / 2.0).astype(dtype)


def symmetric_contrastive_loss(queries, keys, temperature: float):
  """builder.py's `contrastive_loss` of one pair: (2T x CE over all-gathered keys, accuracy).

  Args:
    queries: [n, dim] this device's predictor outputs (not normalised).
    keys: [n, dim] this device's momentum-encoder outputs of the other view.
    temperature: T.
  """
  q = contrastive.l2_normalize(queries)
  k = jax.lax.all_gather(contrastive.l2_normalize(keys), parallel.AXIS, tiled=True)
  logits = jnp.dot(q, k.T, precision=jax.lax.Precision.HIGHEST) / temperature
  n = q.shape[0]
  labels = jnp.arange(n) + n * jax.lax.axis_index(parallel.AXIS)
  loss, accuracy = contrastive.cross_entropy(logits, labels)
  return loss * (2.0 * temperature), accuracy


@dataclasses.dataclass(frozen=True)
class MoCoV3(base.Method):
  """MoCo v3's static pieces.

  Attributes:
    encoder: `models.MoCoV3Encoder` (backbone, projector `head`, predictor).
    temperature: T (ResNet 1.0, ViT 0.2).
    momentum: m0 (0.99; 0.996 for 1000 epochs).
    momentum_cosine: raise m to 1 over the run (`--moco-m-cos`).
    total_steps: steps of the whole run, set by the loop (`with_total_steps`).
  """
  encoder: Any
  temperature: float
  momentum: float
  momentum_cosine: bool = True
  total_steps: int = 0

  name = 'mocov3'
  resume_fields = ()

  @classmethod
  def from_config(cls, config, num_devices: int, num_examples: int = 0) -> 'MoCoV3':
    del num_devices, num_examples  # SyncBN on any mesh; nothing kept per example.
    encoder = models.create_mocov3_encoder(config.model, bn_axis_name=parallel.AXIS)
    v3 = config.mocov3
    return cls(encoder=encoder, temperature=v3.temperature, momentum=v3.momentum,
               momentum_cosine=v3.momentum_cosine)

  def with_total_steps(self, total_steps: int) -> 'MoCoV3':
    return dataclasses.replace(self, total_steps=int(total_steps))

  @classmethod
  def check_config(cls, config, num_devices: int) -> None:
    model = config.model
    contrastive.check_temperature_and_momentum(config, 'mocov3', 'ResNet 1.0, ViT 0.2',
                                               'paper: 0.99')
    _require(isinstance(config.mocov3.momentum_cosine, bool),
             f'config.mocov3.momentum_cosine={config.mocov3.momentum_cosine!r} must be True or '
             'False.')
    if models.is_vit(model):
      patch = model.patch_size if model.patch_size > 0 else models.VIT_ARCHS[model.name][0]
      _require(config.data.image_size % patch == 0,
               f'config.data.image_size={config.data.image_size} is not a multiple of the ViT '
               f'patch {patch}: set --config.model.patch_size to a divisor of it.')
    del num_devices

  @staticmethod
  def describe_batch_norm(config, num_devices: int) -> str:
    del num_devices
    return f'SyncBN: BatchNorm statistics over the global batch of {config.batch_size} per view'

  def init_state(self, rng, params, batch_stats) -> MoCoV3State:
    """The momentum encoder starts as a copy of the backbone and projector."""
    del rng
    key_params = {k: jax.tree.map(jnp.copy, v) for k, v in params.items() if k != 'predictor'}
    key_stats = {k: jax.tree.map(jnp.copy, v) for k, v in batch_stats.items()
                 if k != 'predictor'}
    return MoCoV3State(key_params=key_params, key_batch_stats=key_stats,
                       step=jnp.zeros((), jnp.int32))

  def _apply(self, params, batch_stats, images, predict: bool):
    """(output, new batch stats) of one view through the encoder in train mode."""
    out, updates = self.encoder.apply({'params': params, 'batch_stats': batch_stats}, images,
                                      train=True, predict=predict, mutable=['batch_stats'])
    return out, updates['batch_stats']

  def loss(self, params, batch_stats, method_state: MoCoV3State, batch: base.StepBatch):
    """ctr(q1, k2) + ctr(q2, k1) after this step's momentum update (builder.py's forward)."""
    x1, x2 = batch.query_view, batch.key_view
    q1, batch_stats = self._apply(params, batch_stats, x1, True)
    q2, batch_stats = self._apply(params, batch_stats, x2, True)
    m = momentum_at(method_state.step, self.total_steps, self.momentum, self.momentum_cosine,
                    jnp.promote_types(jax.tree.leaves(params)[0].dtype, jnp.float32))
    current = jax.lax.stop_gradient({k: params[k] for k in method_state.key_params})
    key_params = jax.tree.map(lambda k, q: k * m + q * (1.0 - m), method_state.key_params,
                              current)
    k1, key_stats = self._apply(key_params, method_state.key_batch_stats, x1, False)
    k2, key_stats = self._apply(key_params, key_stats, x2, False)
    k1, k2 = jax.lax.stop_gradient(k1), jax.lax.stop_gradient(k2)
    loss1, acc1 = symmetric_contrastive_loss(q1, k2, self.temperature)
    loss2, acc2 = symmetric_contrastive_loss(q2, k1, self.temperature)
    return loss1 + loss2, base.LossAux(batch_stats=batch_stats, accuracy=(acc1 + acc2) / 2,
                                       synced=key_stats, local=key_params)

  def update(self, params, method_state: MoCoV3State, synced, local, step) -> MoCoV3State:
    """Keeps the momentum encoder this step's loss computed (identical on every device)."""
    del params, step
    return MoCoV3State(key_params=local, key_batch_stats=synced, step=method_state.step + 1)


def _require(condition: bool, message: str):
  if not condition:
    raise errors.ConfigError(message)
