"""The config check before any work: each section checked by the package that reads it.

A typo in an override costs a second, not a traceback from inside XLA after
minutes of compilation. This module holds no list of names and no rule of its
own: the run (`run/checks.py`), the model (`models/checks.py`), the data
(`data/checks.py`), the augmentation (`augmentation/checks.py`), the optimiser
(`training/optim.py`), the method (`methods/registry.py`) and the evaluations
(`evaluation/checks.py`) each check their own section, with the vocabulary of
`core/checks.py`, and say the field and the allowed values.
"""

import ml_collections

from moco_jax.augmentation import checks as aug_checks
from moco_jax.core import errors
from moco_jax.data import checks as data_checks
from moco_jax.evaluation import checks as eval_checks
from moco_jax.methods import registry
from moco_jax.models import checks as model_checks
from moco_jax.run import checks as run_checks
from moco_jax.training import optim

ConfigError = errors.ConfigError  # Importable from here, as before.
check_dataset = run_checks.check_dataset


def validate(config: ml_collections.ConfigDict, *, num_devices: int, process_count: int = 1):
  """Raises ConfigError for the first config value that cannot work."""
  run_checks.check_config(config, num_devices=num_devices, process_count=process_count)
  model_checks.check_config(config.model)
  data_checks.check_config(config)  # The data package reads its own section.
  aug_checks.check_config(config.aug, config.data.get('channels', 3))
  optim.check_config(config.optim)
  registry.check_config(config, num_devices)  # The method's own section.
  eval_checks.check_config(config)
