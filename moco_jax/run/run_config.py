"""A run's own config: WORKDIR/config.json back as a ConfigDict, with overrides.

Pretraining writes its resolved config to WORKDIR/config.json. Evaluating,
exporting or reporting that run must use the same model and data fields
(a different `data.image_size` silently gives another number), so those modes
start from this file instead of a config module:

  python main.py --mode=knn --workdir=DIR [--config.eval.knn_k=20]

`main.py` does it by pointing `--config` at `configs/from_workdir.py:DIR`,
which calls `load_run_config`; `--config.a.b=v` overrides then apply on top,
type-checked by ml_collections as for any config file. Code (a report, a
notebook) calls `load_run_config(workdir, {'eval.knn_k': 20})` directly.

JSON has no tuples: config.json holds lists where the config had tuples
(`aug.mean`, `optim.step_epochs`, ...); they come back as tuples, so
overrides like `--config.aug.mean="(0.5,0.5,0.5)"` parse as they do for the
config modules. Fields a newer version of the code added (absent from an old
config.json) take their `configs/default.py` values.
"""

import json
import os
from typing import Any, Mapping, Optional

import ml_collections

from moco_jax.core import errors

from moco_jax.data import dataset

CONFIG_FILE = 'config.json'


def config_path(workdir: str) -> str:
  return os.path.join(workdir, CONFIG_FILE)


def has_run_config(workdir: Optional[str]) -> bool:
  return bool(workdir) and os.path.isfile(config_path(workdir))


def _tuples(value):
  """JSON lists back to the tuples the config modules use, recursively."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def _fill_missing(config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict):
  """Adds the fields of `defaults` that `config` lacks (new fields, old run)."""
  for key, value in defaults.items():
    if key not in config:
      config[key] = value
    elif isinstance(value, ml_collections.ConfigDict) and isinstance(
        config[key], ml_collections.ConfigDict):
      _fill_missing(config[key], value)


def load_run_config(workdir: str,
                    overrides: Optional[Mapping[str, Any]] = None) -> ml_collections.ConfigDict:
  """WORKDIR/config.json as a ConfigDict, with `overrides` ({'eval.knn_k': 20}) applied.

  Raises FileNotFoundError naming the file and what to do when it is absent.
  """
  path = config_path(workdir)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{path} does not exist: it is written when `python main.py --mode=train` starts in '
        f'that workdir. Pass --config=configs/<name>.py (and the same overrides as the '
        'pretraining run) instead.')
  with open(path) as f:
    try:
      values = json.load(f)
    except json.JSONDecodeError as e:
      raise errors.ConfigError(
          f'{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}): it was edited '
          'or cut short. Fix that line, or pass --config=configs/<name>.py with the pretraining '
          "run's overrides instead.") from e
  if not isinstance(values, dict):
    raise errors.ConfigError(f'{path} holds a {type(values).__name__}, not a config (a JSON '
                             'object): restore it, or pass --config=configs/<name>.py.')
  config = ml_collections.ConfigDict(_tuples(values))
  from configs import default  # pylint: disable=g-import-not-at-top
  _fill_missing(config, default.get_config())
  for dotted, value in (overrides or {}).items():
    set_field(config, dotted, value)
  return config


def set_field(config: ml_collections.ConfigDict, dotted: str, value):
  """config.a.b = value for dotted 'a.b'; a KeyError names a field that does not exist."""
  *parents, leaf = dotted.split('.')
  node = config
  for name in parents:
    node = node[name]
  if leaf not in node:
    raise KeyError(f'config.{dotted} does not exist in {CONFIG_FILE}.')
  node[leaf] = _tuples(value)


def flatten(config, prefix: str = '') -> dict:
  """{'a.b': value} of every leaf of a ConfigDict (or nested dict)."""
  out = {}
  for key, value in config.items():
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


# Fields that change what an evaluation of a run measures (eval.* are meant to vary).
MEASURED_FIELDS = ('model.', 'data.source', 'data.name', 'data.path', 'data.data_dir',
                   'data.train_split', 'data.eval_split', 'data.image_size', 'data.cache_size',
                   'data.cache_ratio', 'aug.mean', 'aug.std')


def differences(config, workdir: str, fields=MEASURED_FIELDS) -> dict:
  """{'a.b': (value in WORKDIR/config.json, value in `config`)} of differing `fields`.

  `fields` are dotted names or prefixes ending in '.'.
  """
  if not has_run_config(workdir):
    return {}
  saved_config = load_run_config(workdir)
  saved, given = flatten(saved_config), flatten(config)
  # The decoded size is what matters, not how it was given (cache_size 32 = ratio 1 at 32 px).
  for flat, cfg in ((saved, saved_config), (given, config)):
    for key in ('data.cache_size', 'data.cache_ratio'):
      flat.pop(key, None)
    flat['data.cache_size'] = dataset.image_side(cfg.data)
  out = {}
  for key in sorted(set(saved) | set(given)):
    wanted = any(key.startswith(f) if f.endswith('.') else key == f for f in fields)
    if wanted and saved.get(key) != given.get(key):
      out[key] = (saved.get(key), given.get(key))
  return out
