"""Test setup: 8 simulated CPU devices, set before JAX is imported anywhere."""

import ast
import functools
import os
import sys

# XLA:CPU's older loop emitters instead of its fusion emitters: the same arithmetic, compiled in
# ~2/3 of the time (docs/architecture.md, "Testing"). The runs the tests start keep the flag
# (helpers.xla_flags).
COMPILE_FLAGS = ('--xla_cpu_use_fusion_emitters=false',)
# Once: pytest-xdist's workers inherit the controller's environment and import this file again.
for _flag in (*COMPILE_FLAGS, '--xla_force_host_platform_device_count=8'):
  if _flag.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _flag).strip()
# XLA's backend optimisations off (here and in the runs the tests start): compiling is most of the
# suite's time and its programs are tiny. The official goldens are compared with them on
# (helpers.xla_optimized).
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The tests compile the same tiny programs many times (every train_and_evaluate
# builds its own jitted step, subprocesses start cold): a persistent compilation
# cache shared by this session's processes turns the repeats into cache hits.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '.cache',
                                   'jax_test_cache'))
# Programs that compile in under 0.3 s are not written: the references run op by op (eager
# jax.grad through a ResNet compiles ~1,000 tiny programs), and writing each under the cache's file
# lock cost more than compiling it again (docs/architecture.md, "Testing").
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.3')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
# A size bound makes JAX lock the directory for every read and write (moco_jax/run/compile_cache.py):
# the suite's subprocesses share it with this process.
os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(4 << 30))


_CACHE_DIR = os.environ['JAX_COMPILATION_CACHE_DIR']  # Tests may unset it (test_compile_cache).


def _heal_compile_cache():
  from moco_jax.run import compile_cache  # pylint: disable=g-import-not-at-top
  compile_cache.heal(_CACHE_DIR)


def pytest_sessionstart(session):
  """A cache entry left half-written by a killed process stops every later write to the cache
  (moco_jax/run/compile_cache.heal): repaired before the suite and after each test (the
  SIGKILL tests kill runs mid-write)."""
  del session
  if os.path.isdir(_CACHE_DIR):
    _heal_compile_cache()


def pytest_runtest_teardown(item):
  del item
  if os.path.isdir(_CACHE_DIR):
    _heal_compile_cache()


@functools.cache
def _shares_fixtures(path: str) -> bool:
  """Whether the test module at `path` defines a fixture that outlives one test (scope=...)."""
  if not path.endswith('.py') or not os.path.isfile(path):
    return False
  with open(path) as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    if isinstance(node, ast.FunctionDef):
      for decorator in node.decorator_list:
        keywords = decorator.keywords if isinstance(decorator, ast.Call) else ()
        if any(k.arg == 'scope' and getattr(k.value, 'value', None) != 'function'
               for k in keywords):
          return True
  return False


def pytest_xdist_make_scheduler(config, log):
  """pytest-xdist's load balancing, but a module with shared fixtures goes to one worker whole.

  Split across two workers, such a module builds its fixtures twice (test_multiprocess's chain of
  2-process runs, in some runs: docs/architecture.md, "Testing"). `--dist loadgroup` would do it
  with marks, but pytest-xdist 3.8 cannot rename pytest 9's test ids, so its groups never form.
  """
  if config.getvalue('dist') != 'load':  # Another --dist, asked for by name.
    return None
  from xdist import scheduler  # pylint: disable=g-import-not-at-top

  class Scheduler(scheduler.LoadScopeScheduling):
    """A module's path is the unit of work of a module with shared fixtures, else a test's id."""

    def _split_scope(self, nodeid):
      path = nodeid.split('::', 1)[0]
      return path if _shares_fixtures(os.path.join(config.rootpath, path)) else nodeid

  return Scheduler(config, log)
