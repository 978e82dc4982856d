"""Writing files so that a reader never sees half of one."""

import os
from typing import Callable


def atomic_write(path: str, write: Callable, binary: bool = False) -> None:
  """Calls write(f) on a temporary file beside `path`, then renames it over `path`.

  The rename is atomic on POSIX file systems: a crash, or a concurrent reader
  (another process of the same host), sees the old file or the new one, never
  a partial one.
  """
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb' if binary else 'w') as f:
    write(f)
  os.replace(tmp, path)
