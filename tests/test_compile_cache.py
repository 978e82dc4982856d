"""config.compile_cache_dir: JAX's persistent compilation cache for runs and evaluations."""

import os

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache
import jax.numpy as jnp
import numpy as np
import pytest

from moco_jax.run import compile_cache

_FIELDS = ('jax_enable_compilation_cache', 'jax_compilation_cache_dir',
           'jax_compilation_cache_max_size', 'jax_persistent_cache_min_compile_time_secs')


@pytest.fixture
def restored():
  """This process's cache settings (tests/conftest.py's), put back after the test."""
  before = {name: getattr(jax.config, name) for name in _FIELDS}
  yield
  for name, value in before.items():
    jax.config.update(name, value)
  jax_cache.reset_cache()


def _compile_something_new(seed: float):
  """Compiles (and runs) a program no earlier test compiled: a constant of its own."""
  return np.asarray(jax.jit(lambda x: jnp.sin(x) * seed)(jnp.arange(3.0)))


def test_the_cache_directory_receives_the_programs_and_serves_them(tmp_path, monkeypatch,
                                                                   restored):
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
  monkeypatch.delenv('JAX_COMPILATION_CACHE_MAX_SIZE', raising=False)
  where = compile_cache.enable(str(tmp_path / 'cache'))
  jax_cache.reset_cache()
  assert where == str(tmp_path / 'cache')
  assert jax.config.jax_compilation_cache_max_size == compile_cache.MAX_BYTES
  # A program this small compiles faster than JAX's threshold for writing it (tests/conftest.py).
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  first = _compile_something_new(1.2345)
  entries = [n for n in os.listdir(where) if n.endswith('-cache')]
  assert entries, os.listdir(where)
  # A fresh process is simulated by clearing the in-memory caches: the program is read back.
  jax.clear_caches()
  jax_cache.reset_cache()
  np.testing.assert_array_equal(_compile_something_new(1.2345), first)
  assert sorted(n for n in os.listdir(where) if n.endswith('-cache')) == sorted(entries)


def test_empty_turns_it_off_and_the_environment_wins_over_the_config(tmp_path, monkeypatch,
                                                                     restored):
  assert compile_cache.enable('') == ''
  assert not jax.config.jax_enable_compilation_cache
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'from_env'))
  assert compile_cache.enable(str(tmp_path / 'from_config')) == str(tmp_path / 'from_env')
  assert jax.config.jax_enable_compilation_cache
  assert compile_cache.enable('') == ''  # '' still turns it off.


def test_an_unwritable_directory_is_a_warning_and_no_cache(tmp_path, monkeypatch, restored,
                                                           caplog):
  monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  with caplog.at_level('WARNING'):
    assert compile_cache.enable(str(blocker / 'cache')) == ''
  assert not jax.config.jax_enable_compilation_cache
  assert 'is not a writable directory' in caplog.text and 'compile_cache_dir' in caplog.text


def test_heal_repairs_an_entry_a_killed_process_left_without_its_access_time(tmp_path):
  """JAX's size-bounded cache reads every entry's access time before each write: one entry
  without it (a process killed between its two files) makes every later write fail, until
  compile_cache.heal gives it one."""
  from jax._src import lru_cache  # pylint: disable=g-import-not-at-top
  cache = lru_cache.LRUCache(str(tmp_path), max_size=1 << 20)
  cache.put('first', b'compiled')
  os.remove(tmp_path / 'first-atime')  # Killed between the two writes.
  with pytest.raises(FileNotFoundError):
    cache.put('second', b'compiled')
  assert compile_cache.heal(str(tmp_path)) == 1
  assert compile_cache.heal(str(tmp_path)) == 0
  cache.put('second', b'compiled')
  assert cache.get('second') == b'compiled' and cache.get('first') == b'compiled'
