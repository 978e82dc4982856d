"""The mistakes a user can make, as exception types `moco_jax.cli` turns into one message.

Each message names the field, path or checkpoint at fault and the fix; the CLI
prints it alone as `Error (<kind>): <message>` (no traceback unless --verbose)
and exits with `EXIT_CODE`. Each type carries its own `kind`, so a new type
needs no table elsewhere.
The types also derive from the built-in error a caller would expect
(ValueError, FileNotFoundError, FloatingPointError), so library callers and
existing `except ValueError` code keep working.
"""

import os
import sys

EXIT_CODE = 2  # Non-zero, and distinct from a crash (1).


def exit_with_message(kind: str, message: str):
  """Prints 'Error (<kind>): <message>' as one line on stderr and ends the process with EXIT_CODE.

  Not sys.exit: interpreter teardown with Orbax/TensorStore objects still alive
  can print a stray 'Event loop is closed' traceback after the message, and a
  watchdog thread (jax.distributed start-up) must end the process, not itself.
  Pending saves of good checkpoints were waited for before the error was raised
  (guard.Guard).
  """
  message = ' '.join(str(message).split())  # One line, however the message was built.
  print(f'Error ({kind}): {message}', file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(EXIT_CODE)  # pylint: disable=protected-access


class UserError(Exception):
  """A mistake the user can fix: the message names what is wrong and the fix."""
  kind = 'input'


class ConfigError(UserError, ValueError):
  """A config value (or combination) that cannot work."""
  kind = 'config'


class DataError(UserError, ValueError):
  """A dataset that cannot be read as configured (path, archive, tfds name, split)."""
  kind = 'data'


class DataNotFoundError(DataError, FileNotFoundError):
  """A dataset path or prepared tfds dataset that does not exist."""


class CheckpointError(UserError, ValueError):
  """A workdir or checkpoint that cannot be used (unwritable, corrupt, another run's)."""
  kind = 'checkpoint'


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """No checkpoint where one is needed."""


class NonFiniteError(UserError, FloatingPointError):
  """Training diverged (NaN/Inf); the last finite checkpoint is kept."""
  kind = 'diverged'


class DistributedError(UserError, ValueError):
  """A many-process start that cannot work (process id, count, coordinator address)."""
  kind = 'distributed'


class OutputError(UserError, OSError):
  """A path the program writes that exists as the wrong thing or cannot be written."""
  kind = 'output'
