"""End-to-end (MoCo v1 Fig. 2a): the keys come from the trained encoder, with gradients.

One encoder encodes both views; the negatives of a query are the other keys of
the global batch (all-gathered across devices and processes), its positive is
its own key, so the dictionary is the batch: K = batch - 1. Gradients flow
through the queries and the keys, which is what makes it memory-hungry (the
v2 report's Table 3: 7.4 GB per GPU at batch 256 against MoCo's 5.0, 93 GB
estimated at 4096).

BatchNorm: the MoCo paper (Sec. 3.3) uses Shuffle BN "in both our method and
its end-to-end ablation counterpart": with per-device statistics a query and
its positive key are normalised together in the same batch, and the model can
find the positive from the shared statistics instead of the image (the leak of
MoCo's 'local' mode; here the key view is in the same batch as its query too).
So `end_to_end.bn_mode` defaults to 'shuffle': the key batch is permuted
across devices before the encoder and restored after (the same
`contrastive.encode_keys` as MoCo, but with gradients); 'local' (the leaking
ablation) is there to compare. 'sync' (global statistics, as SimCLR) is
refused: with the key encoder differentiated through the all-gather, its
gradient on 8 devices was 0.3% off the one-device gradient (the queries' own
path and per-device BatchNorm agree to 3e-6), a bug not yet found.
The encoder's running statistics see the query view, then the key view, as a
PyTorch module called twice would.
"""

import dataclasses
from typing import Any

import jax

from moco_jax.core import errors
from moco_jax.methods import base
from moco_jax.methods import contrastive


@dataclasses.dataclass(frozen=True)
class EndToEnd(base.Method):
  """End-to-end's static pieces.

  Attributes:
    encoder: the Flax encoder of queries and keys (one set of parameters).
    temperature: T of InfoNCE.
    shuffle_keys: Shuffle BN on the key view (`end_to_end.bn_mode` 'shuffle').
  """
  encoder: Any
  temperature: float
  shuffle_keys: bool

  name = 'end_to_end'
  resume_fields = ('end_to_end.bn_mode',)

  @classmethod
  def from_config(cls, config, num_devices: int, num_examples: int = 0) -> 'EndToEnd':
    del num_examples  # Nothing kept per example.
    section = config.end_to_end
    return cls(encoder=contrastive.create_encoder(config.model, section.bn_mode,
                                                  section.bn_splits, num_devices),
               temperature=section.temperature, shuffle_keys=section.bn_mode == 'shuffle')

  @classmethod
  def check_config(cls, config, num_devices: int) -> None:
    section = config.end_to_end
    contrastive.check_resnet_encoder(config)
    contrastive.check_temperature_and_momentum(config, 'end_to_end', 'MoCo v1: 0.07')
    if config.batch_size < 2:
      raise errors.ConfigError(
          f'config.batch_size={config.batch_size}: end-to-end needs >= 2 (its negatives are '
          'the other keys of the batch: K = batch_size - 1).')
    contrastive.check_bn_config('end_to_end', section.bn_mode, section.bn_splits,
                                config.batch_size, num_devices, modes=('shuffle', 'local'))

  @staticmethod
  def describe_batch_norm(config, num_devices: int) -> str:
    section = config.end_to_end
    groups = contrastive.bn_groups_per_device(section.bn_mode, section.bn_splits, num_devices)
    return (f'{groups * num_devices} BatchNorm groups of '
            f'{config.batch_size // num_devices // groups} images ({section.bn_mode})')

  def init_state(self, rng, params, batch_stats):
    del rng, params, batch_stats
    return ()  # Nothing beside the encoder.

  def loss(self, params, batch_stats, method_state, batch: base.StepBatch):
    """InfoNCE of this device's queries against all keys of the global batch, both differentiated."""
    del method_state
    queries, updates = self.encoder.apply({'params': params, 'batch_stats': batch_stats},
                                          batch.query_view, train=True, mutable=['batch_stats'])
    # No stop_gradient: the same params encode the keys and get their gradient.
    keys, batch_stats = contrastive.encode_keys(self.encoder, params, updates['batch_stats'],
                                                batch.key_view, batch.rng, self.shuffle_keys)
    logits, labels = contrastive.in_batch_logits(contrastive.l2_normalize(queries), keys,
                                                 self.temperature)
    loss, accuracy = contrastive.cross_entropy(logits, labels)
    return loss, base.LossAux(batch_stats=batch_stats, accuracy=accuracy)
