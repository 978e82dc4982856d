"""The mistakes a user can make, as exception types `main.py` turns into one message.

Each message names the field, path or checkpoint at fault and the fix; `main.py`
prints it alone (no traceback unless --verbose) and exits with `EXIT_CODE`.
The types also derive from the built-in error a caller would expect
(ValueError, FileNotFoundError, FloatingPointError), so library callers and
existing `except ValueError` code keep working.
"""

EXIT_CODE = 2  # Non-zero, and distinct from a crash (1).


class UserError(Exception):
  """A mistake the user can fix: the message names what is wrong and the fix."""


class ConfigError(UserError, ValueError):
  """A config value (or combination) that cannot work."""


class DataError(UserError, ValueError):
  """A dataset that cannot be read as configured (path, archive, tfds name, split)."""


class DataNotFoundError(DataError, FileNotFoundError):
  """A dataset path or prepared tfds dataset that does not exist."""


class CheckpointError(UserError, ValueError):
  """A workdir or checkpoint that cannot be used (unwritable, corrupt, another run's)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """No checkpoint where one is needed."""


class NonFiniteError(UserError, FloatingPointError):
  """Training diverged (NaN/Inf); the last finite checkpoint is kept."""
