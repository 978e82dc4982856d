"""The run's own config fields: batch, length, seed, logging and checkpoint periods.

The other sections are checked by their owners; `moco_jax.config_checks`
calls them all.
"""

from moco_jax.core import checks
from moco_jax.core import errors

ConfigError = errors.ConfigError


def check_config(config, *, num_devices: int, process_count: int = 1) -> None:
  """ConfigError naming the first top-level field that cannot work on this many devices."""
  check = lambda field, ok, rule, hint='': checks.check(config, field, ok, rule, hint)
  batch = config.batch_size
  check('batch_size', checks.positive_int, 'must be > 0', 'the global batch')
  checks.require(batch % num_devices == 0,
                 f'config.batch_size={batch} is not divisible by the {num_devices} devices: use a '
                 f'multiple of {num_devices}, e.g. '
                 f'--config.batch_size={max(1, batch // num_devices) * num_devices}.')
  checks.require(batch % process_count == 0,
                 f'config.batch_size={batch} is not divisible by the {process_count} processes.')
  if 'compile_cache_dir' in config:
    check('compile_cache_dir', checks.text,
          "must be a directory path ('' turns JAX's persistent compilation cache off)")
  check('num_train_steps', lambda v: checks.integer(v) and (v == -1 or v > 0),
        'must be -1 (num_epochs x steps per epoch) or > 0')
  if config.num_train_steps == -1:
    check('num_epochs', lambda v: checks.number(v) and v > 0,
          'must be > 0 when config.num_train_steps=-1')
  else:
    check('num_epochs', checks.number, 'must be a number', 'unused: num_train_steps is set')
  check('seed', lambda v: checks.integer(v) and 0 <= v < 2**32, 'must be an integer in [0, 2^32)',
        'NumPy and grain seed their generators with it')
  check('log_every_steps', checks.positive_int, 'must be > 0')
  check('checkpoint_every_steps', checks.positive_int, 'must be > 0')
  check('keep_checkpoints', checks.positive_int,
        'must be >= 1: with 0 the run keeps no checkpoint and cannot resume or be evaluated')
  check('allow_config_change', checks.flag, 'must be True or False')
  check('tensorboard', checks.flag, 'must be True or False')
  check('method', checks.nonempty_text, 'must name a method')


def check_dataset(config, num_examples: int):
  """The dataset must hold at least one global batch."""
  checks.require(num_examples >= config.batch_size,
                 f'config.batch_size={config.batch_size} is larger than the training split '
                 f'({num_examples} examples): lower --config.batch_size.')
