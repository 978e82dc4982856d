"""Config validation: reject bad values before anything is compiled.

Every message names the field and says how to fix it, so a typo in an override
costs a second, not a traceback from inside XLA after minutes of compilation.
"""

import math
import numbers

import jax
import ml_collections

from moco_jax import models
from moco_jax.core import errors
from moco_jax.data import normalisation
from moco_jax.methods import registry
from moco_jax.training import optim

_CHOICES = {
    ('model', 'name'): models.NAMES,
    ('model', 'stem'): ('imagenet', 'cifar'),
    ('model', 'head'): ('mlp', 'linear'),
    ('model', 'dtype'): ('float32', 'bfloat16', 'float64'),
    ('optim', 'name'): optim.OPTIMIZERS,
    ('optim', 'schedule'): ('cosine', 'step', 'constant'),
    ('data', 'source'): ('tfds', 'folder', 'synthetic'),
    ('eval', 'linear_schedule'): ('step', 'cosine'),
    ('eval', 'linear_protocol'): ('standardized', 'raw', 'paper'),
}

ConfigError = errors.ConfigError  # Importable from here, as before.


def _require(condition: bool, message: str):
  if not condition:
    raise ConfigError(message)


def validate(config: ml_collections.ConfigDict, *, num_devices: int, process_count: int = 1):
  """Raises ConfigError for the first config value that cannot work."""
  for (section, field), choices in _CHOICES.items():
    value = config[section][field]
    _require(value in choices,
             f'config.{section}.{field}={value!r} is not one of {list(choices)}.')
  _require(config.model.dtype != 'float64' or jax.config.jax_enable_x64,
           "config.model.dtype='float64' needs JAX_ENABLE_X64=1 in the environment (float64 is "
           'for numerical checks: XLA:CPU runs it several times slower than float32).')
  batch = config.batch_size
  _require(isinstance(batch, int) and batch > 0, f'config.batch_size={batch!r} must be > 0.')
  _require(batch % num_devices == 0,
           f'config.batch_size={batch} is not divisible by the {num_devices} devices: use a '
           f'multiple of {num_devices}, e.g. --config.batch_size={max(1, batch // num_devices) * num_devices}.')
  _require(batch % process_count == 0,
           f'config.batch_size={batch} is not divisible by the {process_count} processes.')
  _require(_number(config.optim.base_lr) and config.optim.base_lr > 0, f'config.optim.base_lr={config.optim.base_lr} must be > 0.')
  _require(config.optim.weight_decay >= 0,
           f'config.optim.weight_decay={config.optim.weight_decay} must be >= 0.')
  _require(0 <= config.optim.momentum < 1,
           f'config.optim.momentum={config.optim.momentum} must be in [0, 1).')
  _require(config.optim.warmup_epochs >= 0,
           f'config.optim.warmup_epochs={config.optim.warmup_epochs} must be >= 0.')
  _require(config.model.embed_dim > 0, f'config.model.embed_dim={config.model.embed_dim} must be > 0.')
  _check_head_dims(config.model)
  _require(config.model.width > 0, f'config.model.width={config.model.width} must be > 0.')
  _require(config.data.image_size > 0, f'config.data.image_size={config.data.image_size} must be > 0.')
  budget = config.data.get('max_in_memory_gb', -1)
  _require(budget == -1 or budget >= 0,
           f'config.data.max_in_memory_gb={budget} must be >= 0 (GiB), or -1 for 25% of RAM.')
  processes = config.data.get('stream_processes', -1)
  _require(isinstance(processes, int) and processes >= -1,
           f'config.data.stream_processes={processes!r} must be an int >= 0, or -1 for '
           'one per core but one.')
  registry.check_config(config, num_devices)  # The method's own section.
  _require(config.num_epochs > 0 or config.num_train_steps > 0,
           'config.num_epochs or config.num_train_steps must be > 0.')
  _require(config.log_every_steps > 0, f'config.log_every_steps={config.log_every_steps} must be > 0.')
  _require(config.checkpoint_every_steps > 0,
           f'config.checkpoint_every_steps={config.checkpoint_every_steps} must be > 0.')
  _validate_ranges(config)


def _number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check(config, field: str, ok, rule: str, hint: str = ''):
  """Raises ConfigError 'config.<field>=<value> <rule>.' unless ok(value) holds."""
  value = config
  for part in field.split('.'):
    value = value[part]
  try:
    good = bool(ok(value))
  except (TypeError, ValueError, IndexError):
    good = False
  _require(good, f'config.{field}={value!r} {rule}' + (f' ({hint})' if hint else '') + '.')


def _pair(lo_ok, hi_ok=None):
  """A check for an ordered (lo, hi) pair of numbers."""
  def ok(v):
    return (len(v) == 2 and all(_number(x) for x in v) and v[0] <= v[1] and lo_ok(v[0])
            and (hi_ok or (lambda _: True))(v[1]))
  return ok


def _validate_ranges(config):
  """Ranges, orderings and relations of every remaining field, before any work."""
  positive_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0
  probability = lambda v: _number(v) and 0 <= v <= 1
  _check(config, 'num_train_steps', lambda v: v == -1 or v > 0,
         'must be -1 (num_epochs x steps per epoch) or > 0')
  if config.num_train_steps == -1:
    _check(config, 'num_epochs', lambda v: _number(v) and v > 0,
           'must be > 0 when config.num_train_steps=-1')
  _check(config, 'seed', lambda v: isinstance(v, int) and not isinstance(v, bool)
         and 0 <= v < 2**32, 'must be an integer in [0, 2^32)',
         'NumPy and grain seed their generators with it')
  _check(config, 'keep_checkpoints', positive_int,
         'must be >= 1: with 0 the run keeps no checkpoint and cannot resume or be evaluated')
  _check(config, 'model.head_hidden_dim', lambda v: v == -1 or v > 0,
         "must be -1 (the backbone's width) or > 0")
  # Data.
  _check(config, 'data.cache_size', lambda v: v == -1 or v >= config.data.image_size,
         f'must be -1 (= image_size) or >= config.data.image_size={config.data.image_size}',
         'a smaller decoded side would train on upscaled thumbnails')
  _check(config, 'data.num_workers', positive_int, 'must be >= 1 (decoding threads)')
  for field in ('train_split', 'eval_split'):
    _check(config, f'data.{field}', lambda v: isinstance(v, str) and v.strip(),
           'must name a split')
  if config.data.source == 'synthetic' and not config.data.path:
    _check(config, 'data.synthetic_examples', positive_int, 'must be > 0')
    _check(config, 'data.synthetic_classes', positive_int, 'must be > 0')
  # Augmentation.
  _check(config, 'aug.crop_scale', _pair(lambda lo: lo > 0, lambda hi: hi <= 1),
         'must be (min, max) with 0 < min <= max <= 1', 'area fraction of RandomResizedCrop')
  _check(config, 'aug.crop_ratio', _pair(lambda lo: lo > 0),
         'must be (min, max) with 0 < min <= max', 'aspect ratio of RandomResizedCrop')
  _check(config, 'aug.blur_sigma', _pair(lambda lo: lo > 0),
         'must be (min, max) with 0 < min <= max')
  _check(config, 'aug.jitter', lambda v: (len(v) == 4 and all(_number(x) and x >= 0 for x in v)
                                          and v[3] <= 0.5),
         'must be (brightness, contrast, saturation, hue), each >= 0 and hue <= 0.5')
  for field in ('jitter_prob', 'grayscale_prob', 'blur_prob', 'solarize_prob'):
    _check(config, f'aug.{field}', probability, 'must be a probability in [0, 1]')
  for field in ('second_view_blur_prob', 'second_view_solarize_prob'):
    _check(config, f'aug.{field}', lambda v: v == -1 or probability(v),
           'must be -1 (as the first view) or a probability in [0, 1]')
  channels = config.data.get('channels', 3)
  _check(config, 'data.channels', positive_int,
         'must be >= 1 (1 grayscale, 3 RGB, 4 RGBA, or the channels of your .npy / TIFF files)')
  per_channel = ('R, G, B' if channels == 3 else
                 f"one per channel of data.channels={channels}, or 'auto' to compute them")
  _check(config, 'aug.mean', lambda v: normalisation.is_auto(v) or (
      not isinstance(v, str) and len(v) == channels and all(_number(x) for x in v)),
         f'must be {channels} numbers ({per_channel})')
  _check(config, 'aug.std', lambda v: normalisation.is_auto(v) or (
      not isinstance(v, str) and len(v) == channels and all(_number(x) and x > 0 for x in v)),
         f'must be {channels} numbers > 0 ({per_channel})')
  # Optimiser.
  ascending = lambda v: all(_number(x) and x >= 0 for x in v) and list(v) == sorted(v)
  _check(config, 'optim.step_epochs', ascending, 'must be ascending epochs >= 0')
  # Evaluation (checked now, not after the whole pretraining run).
  _check(config, 'eval.knn_every_epochs', lambda v: _number(v) and (v >= 0 or v == -1),
         'must be > 0 (period in epochs), 0 (only at the end) or -1 (never)')
  _check(config, 'eval.knn_k', positive_int, 'must be > 0', 'paper: 200')
  _check(config, 'eval.knn_temperature', lambda v: _number(v) and v > 0, 'must be > 0',
         'paper: 0.1')
  _check(config, 'eval.batch_size', positive_int, 'must be > 0')
  _check(config, 'eval.linear_epochs', positive_int, 'must be > 0', 'paper: 100')
  _check(config, 'eval.linear_lr', lambda v: _number(v) and v > 0, 'must be > 0', 'paper: 30')
  _check(config, 'eval.linear_batch_size', positive_int, 'must be > 0')
  _check(config, 'eval.linear_step_epochs', ascending, 'must be ascending epochs >= 0')
  _check(config, 'eval.linear_weight_decay', lambda v: _number(v) and v >= 0, 'must be >= 0')
  _check(config, 'eval.linear_crop_scale', _pair(lambda lo: lo > 0, lambda hi: hi <= 1),
         'must be (min, max) with 0 < min <= max <= 1', 'paper: (0.08, 1.0)')
  _check(config, 'eval.linear_center_crop', lambda v: _number(v) and 0 < v <= 1,
         'must be in (0, 1]', 'paper: 224 / 256')
  _require(config.eval.linear_protocol != 'paper' or config.eval.linear_schedule == 'step',
           f"config.eval.linear_schedule={config.eval.linear_schedule!r}: the paper protocol "
           "steps its lr (x0.1 at eval.linear_step_epochs); set it to 'step'.")


def _check_head_dims(model_config):
  """head_dims: () (v2's two layers) or positive widths ending in embed_dim, for the MLP head."""
  dims = model_config.head_dims
  if not dims:
    return
  field = f'config.model.head_dims={tuple(dims)!r}'
  _require(all(isinstance(d, int) and d > 0 for d in dims),
           f'{field} must be a list of positive widths (hidden layers, then the output), e.g. '
           '--config.model.head_dims="(100, 50, 25)".')
  _require(model_config.head == 'mlp',
           f"{field} needs config.model.head='mlp' (the linear head is one layer of embed_dim).")
  _require(len(dims) >= 2,
           f'{field} has no hidden layer: list the hidden widths and the output width, or use '
           "--config.model.head=linear for a single layer.")
  _require(dims[-1] == model_config.embed_dim,
           f'{field} ends in {dims[-1]}, but config.model.embed_dim={model_config.embed_dim} (the '
           f'dimension of the queue\'s keys): set --config.model.embed_dim={dims[-1]}.')


def check_dataset(config: ml_collections.ConfigDict, num_examples: int):
  """The dataset must hold at least one global batch."""
  _require(num_examples >= config.batch_size,
           f'config.batch_size={config.batch_size} is larger than the training split '
           f'({num_examples} examples): lower --config.batch_size.')
