"""Writing outputs: one check for every directory the program creates, and write-then-rename.

Every output directory (the workdir, checkpoints, features, the report, exports, caches) is
made by `make_dir`, and may be checked first by `check_dir`, which creates nothing: a refused
command leaves the disk as it found it. Both give one line naming the path and the fix when
the path exists as the wrong thing (a file where a directory goes, a dangling symlink) or
cannot be written (permissions).
"""

import hashlib
import os
from typing import Callable, Optional

from moco_jax.core import errors


def _problem(directory: str) -> Optional[str]:
  """Why `directory` cannot be created and written, or None; creates nothing."""
  path = os.path.abspath(directory)
  while True:
    if os.path.islink(path) and not os.path.exists(path):
      return (f'{path} is a dangling symbolic link (to {os.readlink(path)!r}): remove it or '
              'point it at a directory')
    if os.path.exists(path):
      break
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  if not os.path.isdir(path):
    return f'{path} is a file, not a directory: move it away or choose another path'
  if not os.access(path, os.W_OK | os.X_OK):
    return f'no permission to write in {path}: fix its permissions or choose another path'
  return None


def check_dir(directory: str, what: str) -> None:
  """OutputError naming the path and the fix unless `directory` can be created and written.

  Nothing is created: the check runs before a command is accepted.
  """
  problem = _problem(directory)
  if problem:
    raise errors.OutputError(f'Cannot write {what} to {os.path.abspath(directory)}: {problem}.')


def make_dir(directory: str, what: str) -> str:
  """Creates `directory` (and its parents) for `what`; OutputError naming the path and the fix."""
  check_dir(directory, what)
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise errors.OutputError(
        f'Cannot create {what} directory {os.path.abspath(directory)}: '
        f'{e.strerror or e}. Fix the path or its permissions, or choose another.') from e
  return directory


def check_file(path: str, what: str) -> None:
  """OutputError unless `path` can be (re)written as a file: not a directory, its folder writable."""
  full = os.path.abspath(path)
  if os.path.isdir(full):
    raise errors.OutputError(f'Cannot write {what} to {full}: it is a directory. Move it away '
                             'or choose another path.')
  if os.path.islink(full) and not os.path.exists(full):
    raise errors.OutputError(f'Cannot write {what} to {full}: it is a dangling symbolic link. '
                             'Remove it.')
  check_dir(os.path.dirname(full), what)


def atomic_write(path: str, write: Callable, binary: bool = False) -> None:
  """Calls write(f) on a temporary file beside `path`, then renames it over `path`.

  The rename is atomic on POSIX file systems: a crash, or a concurrent reader
  (another process of the same host), sees the old file or the new one, never
  a partial one.
  """
  check_file(path, os.path.basename(path))
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'wb' if binary else 'w') as f:
      write(f)
    os.replace(tmp, path)
  except OSError as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise errors.OutputError(f'Cannot write {path}: {e.strerror or e}. Make its directory '
                             'writable (permissions, free space) or choose another path.') from e


def sha256_of(path: str, chunk: int = 1 << 24) -> str:
  """sha256 of a file's bytes, read in chunks (a reused artefact's content check)."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while True:
      block = f.read(chunk)
      if not block:
        return digest.hexdigest()
      digest.update(block)


def tree_sha256(directory: str) -> str:
  """sha256 over every file under `directory`: its relative path, then its bytes' sha256, in
  sorted order (a checkpoint directory's content check: a changed, missing or extra file
  changes it)."""
  digest = hashlib.sha256()
  for root, dirs, names in os.walk(directory):
    dirs.sort()
    for name in sorted(names):
      path = os.path.join(root, name)
      digest.update(os.path.relpath(path, directory).encode('utf-8', 'surrogateescape') + b'\0')
      digest.update(sha256_of(path).encode() + b'\n')
  return digest.hexdigest()
