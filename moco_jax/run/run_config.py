"""A run's own config, WORKDIR/config.json: the one module that writes, reads and compares it.

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
config.json) take their `configs/default.py` values (`configs/from_workdir.py`
passes them: the library does not import the repo's configs).

Two questions are asked of a saved config, with one comparison (`compare`) and
two field lists: may this config resume the run's checkpoints
(`run.guard.check_resume_config`, fields that change what a checkpoint means),
and does this evaluation measure the run it evaluates (`MEASURED_FIELDS`, a
warning)? Both compare the decoded image size, not how it was given
(cache_size 128 = cache_size -1 at ratio 1 and 128 px), normalise `data.path`,
and skip a field that the saved config lacks (it was written by a version of
the code before that field existed, which behaved as its default does).
"""

import json
import os
from typing import Any, Mapping, Optional

import ml_collections

from moco_jax.core import errors
from moco_jax.core import files
from moco_jax.data import spec as data_spec

CONFIG_FILE = 'config.json'


def config_path(workdir: str) -> str:
  return os.path.join(workdir, CONFIG_FILE)


def has_run_config(workdir: Optional[str]) -> bool:
  return bool(workdir) and os.path.isfile(config_path(workdir))


def write_run_config(workdir: str, config) -> str:
  """Writes `config` to WORKDIR/config.json atomically (a reader never sees half of it)."""
  path = config_path(workdir)
  files.make_dir(workdir, 'config.json')
  files.atomic_write(path, lambda f: f.write(config.to_json_best_effort(indent=2, sort_keys=True)))
  return path


def read_run_config(workdir: str) -> dict:
  """WORKDIR/config.json as a dict; a ConfigError naming the file, line and fix if it is broken."""
  path = config_path(workdir)
  try:
    with open(path) as f:
      values = json.load(f)
  except json.JSONDecodeError as e:
    raise errors.ConfigError(
        f'{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}): fix or delete '
        'it, or pass --config=configs/<name>.py with the run\'s settings.') from e
  except OSError as e:
    raise errors.ConfigError(f'{path} cannot be read ({e.strerror or e}): fix its permissions, '
                             'or pass --config=configs/<name>.py.') from e
  if not isinstance(values, dict):
    raise errors.ConfigError(f'{path} holds a JSON {type(values).__name__}, not a config '
                             'object: fix or delete it.')
  return values


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


def load_run_config(workdir: str, overrides: Optional[Mapping[str, Any]] = None,
                    defaults: Optional[ml_collections.ConfigDict] = None
                    ) -> ml_collections.ConfigDict:
  """WORKDIR/config.json as a ConfigDict, with `overrides` ({'eval.knn_k': 20}) applied.

  Fields of `defaults` (`configs.default.get_config()`) that the file lacks are
  added. Raises FileNotFoundError naming the file and what to do when it is absent.
  """
  path = config_path(workdir)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{path} does not exist: it is written when `python main.py --mode=train` starts in '
        f'that workdir. Pass --config=configs/<name>.py (and the same overrides as the '
        'pretraining run) instead.')
  config = ml_collections.ConfigDict(_tuples(read_run_config(workdir)))
  if defaults is not None:
    _fill_missing(config, defaults)
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
                   'data.labels', 'data.val_fraction',
                   'data.train_split', 'data.eval_split', 'data.image_size', 'data.cache_size',
                   'data.cache_ratio', 'aug.mean', 'aug.std')


def _comparable(config) -> dict:
  """Flat {'a.b': value} of a config or config dict, as `compare` sees it.

  The decoded side replaces cache_size/cache_ratio, and data.path is absolute.
  """
  flat = flatten(config)
  data = {k[len('data.'):]: v for k, v in flat.items() if k.startswith('data.')}
  for key in ('data.cache_size', 'data.cache_ratio'):
    flat.pop(key, None)
  if 'image_size' in data:
    flat['data.cache_size'] = data_spec.decoded_side(ml_collections.ConfigDict(data))
  if isinstance(flat.get('data.path'), str) and flat['data.path']:
    flat['data.path'] = os.path.normpath(os.path.abspath(os.path.expanduser(flat['data.path'])))
  flat['data identity'] = _data_identity(data)
  return flat


def _data_identity(data: dict):
  """`spec.identity` of a data section (None where it names no data: a check says why elsewhere)."""
  try:
    return data_spec.identity(data_spec.from_config(ml_collections.ConfigDict(
        {'image_size': 1, **data})))
  except (errors.ConfigError, TypeError, ValueError):
    return None


def compare(saved, given, fields) -> dict:
  """{'a.b': (saved value, given value)} of the `fields` that differ.

  `fields` are dotted names or prefixes ending in '.'; a field absent from
  `saved` (an older config.json) is not compared.
  """
  saved, given = _comparable(saved), _comparable(_plain(given))
  out = {}
  for key in sorted(given):
    wanted = any(key.startswith(f) if f.endswith('.') else key == f for f in fields)
    if wanted and key in saved and _plain(saved[key]) != _plain(given[key]):
      out[key] = (saved[key], given[key])
  return out


def _plain(value):
  """JSON-comparable: a ConfigDict as the dict config.json holds, tuples as lists."""
  if isinstance(value, ml_collections.ConfigDict):
    return json.loads(value.to_json_best_effort())
  if isinstance(value, (tuple, list)):
    return [_plain(v) for v in value]
  return value


def differences(config, workdir: str, fields=MEASURED_FIELDS) -> dict:
  """`compare` of WORKDIR/config.json with `config` over `fields` ({} without the file)."""
  if not has_run_config(workdir):
    return {}
  return compare(read_run_config(workdir), config, fields)
