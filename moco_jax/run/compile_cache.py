"""JAX's persistent compilation cache: a program compiled once is read back, not compiled again.

A resumed run, or an evaluation of the model a run trained, compiles the same
XLA programs as the run before it; on a CPU a ResNet's step takes tens of
seconds to compile. With the cache on, JAX keys each compiled program by its
HLO, the JAX and XLA versions, the flags and the devices, and a later process
that builds the same program loads it instead (docs/benchmarks.md has the
times). A changed model, batch or device count is another key: nothing stale
is ever read.

Many processes may share the directory: entries are written and read under
one file lock (JAX takes it when the cache has a size bound, which is why one
is set here), and of the processes of one job only process 0 writes. A cache
that cannot be written is a warning and no cache, never an error.
"""

import os
import time

from absl import logging
import jax

# Least recently used entries are removed beyond this; a ResNet-50 step is ~100 MB.
MAX_BYTES = 4 << 30
# An entry's two files in JAX's size-bounded cache (jax/_src/lru_cache.py).
_CACHE, _ATIME = '-cache', '-atime'


def enable(path: str) -> str:
  """Points JAX's persistent compilation cache at `path` ('' turns it off).

  Call before the first compilation. JAX_COMPILATION_CACHE_DIR in the
  environment, when set, wins over `path` (whoever set it manages the cache:
  the test suite, a cluster's job script), but '' still turns the cache off.

  Returns:
    The directory used, or '' when the cache is off.
  """
  if not path:
    jax.config.update('jax_enable_compilation_cache', False)
    logging.info('Persistent compilation cache off (config.compile_cache_dir is empty).')
    return ''
  directory = os.path.abspath(os.path.expanduser(
      os.environ.get('JAX_COMPILATION_CACHE_DIR') or path))
  try:
    os.makedirs(directory, exist_ok=True)
    writable = os.access(directory, os.W_OK)
  except OSError:
    writable = False
  if not writable:
    jax.config.update('jax_enable_compilation_cache', False)
    logging.warning('Persistent compilation cache off: %s is not a writable directory (set '
                    '--config.compile_cache_dir to another, or to "" to silence this).',
                    directory)
    return ''
  healed = heal(directory)
  if healed:
    logging.info('Persistent compilation cache: gave %d entries the access-time file a killed '
                 'process left out.', healed)
  jax.config.update('jax_enable_compilation_cache', True)
  jax.config.update('jax_compilation_cache_dir', directory)
  if 'JAX_COMPILATION_CACHE_MAX_SIZE' not in os.environ:
    jax.config.update('jax_compilation_cache_max_size', MAX_BYTES)
  logging.info('Persistent compilation cache: %s', directory)
  return directory


def heal(directory: str) -> int:
  """Gives each cache entry that lacks its access-time file one; returns how many it healed.

  With a size bound, JAX writes an entry's `<key>-cache` file, then its
  `<key>-atime` file, and before every later write reads the access time of
  every entry to choose what to evict. A process killed between the two
  writes (SIGKILL, preemption) leaves an entry without its access time, and
  from then on every write to the cache fails ("Error writing persistent
  compilation cache entry ... -atime"): every run compiles from scratch again.
  Writing the missing access times (now) repairs it; a concurrent writer that
  writes its own afterwards changes nothing that matters.
  """
  try:
    names = set(os.listdir(directory))
  except OSError:
    return 0
  healed = 0
  for name in names:
    key = name[:-len(_CACHE)] if name.endswith(_CACHE) else None
    if key is None or key + _ATIME in names:
      continue
    try:
      with open(os.path.join(directory, key + _ATIME), 'wb') as f:
        f.write(time.time_ns().to_bytes(8, 'little'))
      healed += 1
    except OSError:
      pass
  return healed
