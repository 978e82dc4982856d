"""main.py for tests/test_multiprocess.py, with a gate to stop a run at a known step.

  MOCO_TEST_GATE=STEP:DIR[:PROCESS]  python tests/multiprocess_main.py <main.py flags>

Before the batch of step STEP + 1 (that is, after STEP steps and their
checkpoint), the process (every process, or only process PROCESS) writes
DIR/reached.<process_id> and waits until DIR/open exists. The test then kills
or signals it at a step it knows, with no race against a fast run. Without
MOCO_TEST_GATE this is exactly main.py.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

import main  # pylint: disable=g-bad-import-order
from moco_jax import cli
from moco_jax.data import batching

_GATE_TIMEOUT = 300


def _every_process_writes_the_compilation_cache():
  """Lets processes other than 0 write their own persistent-cache entries (tests only).

  JAX writes the persistent compilation cache from process 0 alone, and on CPU
  the cache key of process 1 differs from process 0's (it hashes the CPU
  topology as each process sees it), so process 1 would compile every program
  in every run: about 25 s of CPU per run of the test. Its keys are its own,
  so its writes contend with nothing. Private API: if it moves, nothing
  breaks, the test is only slower.
  """
  try:
    from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
    from jax._src import compiler
    from jax._src import config
    from jax._src import distributed
  except ImportError:
    return
  real = getattr(compiler, '_cache_write', None)
  if real is None:
    return

  def cache_write(cache_key, compile_time_secs, module_name, backend, executable,
                  host_callbacks):
    if (distributed.global_state.process_id == 0 or host_callbacks or
        compile_time_secs < config.persistent_cache_min_compile_time_secs.value):
      return real(cache_key, compile_time_secs, module_name, backend, executable,
                  host_callbacks)
    try:
      compilation_cache.put_executable_and_time(cache_key, module_name, executable, backend,
                                                int(compile_time_secs))
    except Exception:  # pylint: disable=broad-except
      pass  # A cache that cannot be written only costs time.

  compiler._cache_write = cache_write  # pylint: disable=protected-access


def _gated(train_batches, gate_step: int, gate_dir: str, only_process):
  def gated(*args, **kwargs):
    process = flags.FLAGS.process_id or 0
    start = kwargs.get('start_step', 0)
    for step, batch in enumerate(train_batches(*args, **kwargs), start=start):
      if step == gate_step and only_process in (None, process):
        with open(os.path.join(gate_dir, f'reached.{process}'), 'w') as f:
          f.write(str(os.getpid()))
        deadline = time.time() + _GATE_TIMEOUT
        while not os.path.exists(os.path.join(gate_dir, 'open')):
          if time.time() > deadline:
            raise TimeoutError(f'{gate_dir}/open did not appear in {_GATE_TIMEOUT} s')
          time.sleep(0.02)
      yield batch
  return gated


if __name__ == '__main__':
  _every_process_writes_the_compilation_cache()
  gate = os.environ.get('MOCO_TEST_GATE')
  if gate:
    parts = gate.split(':')
    batching.train_batches = _gated(batching.train_batches, int(parts[0]), parts[1],
                                    int(parts[2]) if len(parts) > 2 else None)
  app.run(main.main, flags_parser=cli.parse_flags)
