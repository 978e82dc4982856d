"""The vocabulary of config checks: each package checks its own section with these.

A check reads one field, tests it without ever raising anything but
ConfigError (a NaN, a string where a number goes, a list of the wrong length
all fail the test instead of crashing it), and says
'config.<field>=<value> <rule> (<hint>).'. The owners (models, training.optim,
data, augmentation, methods, evaluation, run) hold their lists of names; the
composer (`moco_jax.config_checks`) only calls them.
"""

import math
import numbers
from typing import Any, Callable, Iterable

from moco_jax.core import errors


def require(condition: bool, message: str):
  if not condition:
    raise errors.ConfigError(message)


def number(value) -> bool:
  """A finite real number (not a bool)."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def integer(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(value) -> bool:
  return integer(value) and value > 0


def probability(value) -> bool:
  return number(value) and 0 <= value <= 1


def flag(value) -> bool:
  return isinstance(value, bool)


def text(value) -> bool:
  return isinstance(value, str)


def nonempty_text(value) -> bool:
  return isinstance(value, str) and bool(value.strip())


def ascending(value) -> bool:
  """A sequence of finite numbers >= 0 in ascending order (epochs of a step schedule)."""
  return (isinstance(value, (list, tuple)) and all(number(x) and x >= 0 for x in value)
          and list(value) == sorted(value))


def pair(lo_ok: Callable[[Any], bool], hi_ok: Callable[[Any], bool] = lambda _: True):
  """A check for an ordered (lo, hi) pair of finite numbers."""
  def ok(v):
    return (isinstance(v, (list, tuple)) and len(v) == 2 and all(number(x) for x in v)
            and v[0] <= v[1] and lo_ok(v[0]) and hi_ok(v[1]))
  return ok


def read(section, field: str):
  """`section`'s value at the dotted `field`."""
  value = section
  for part in field.split('.'):
    value = value[part]
  return value


def check(section, field: str, ok: Callable[[Any], bool], rule: str, hint: str = '',
          prefix: str = 'config.'):
  """ConfigError '<prefix><field>=<value> <rule> (<hint>).' unless ok(value) holds.

  `section` is the config or one of its sections; `prefix` is how the user
  spells that section ('config.data.' for config.data).
  """
  value = read(section, field)
  try:
    good = bool(ok(value))
  except (TypeError, ValueError, IndexError, KeyError, AttributeError):
    good = False
  require(good, f'{prefix}{field}={value!r} {rule}' + (f' ({hint})' if hint else '') + '.')


def choice(section, field: str, choices: Iterable, prefix: str = 'config.'):
  """ConfigError unless the field is one of `choices` (listed in the message)."""
  choices = list(choices)
  check(section, field, lambda v: isinstance(v, type(choices[0])) and v in choices,
        f'is not one of {choices}', prefix=prefix)
