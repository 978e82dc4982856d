"""How the suite spreads over pytest-xdist workers (tests/conftest.py's scheduler)."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_modules_with_shared_fixtures_are_one_unit_of_xdist_work(tmp_path):
  """tests/conftest.py's scheduler keeps a module whose fixtures outlive a test on one worker."""
  import conftest  # pylint: disable=g-import-not-at-top
  shares = conftest._shares_fixtures  # pylint: disable=protected-access
  cases = {'module': "@pytest.fixture(scope='module')\ndef f():\n  return 1\n",
           'params': "@pytest.fixture(scope='session', params=[1, 2])\ndef f(request):\n  pass\n",
           'function': "@pytest.fixture(scope='function')\ndef f():\n  return 1\n",
           'plain': '@pytest.fixture\ndef f():\n  return 1\n',
           'none': 'def test_a():\n  pass\n'}
  found = {}
  for name, text in cases.items():
    (tmp_path / f'test_{name}.py').write_text('import pytest\n\n' + text)
    found[name] = shares(str(tmp_path / f'test_{name}.py'))
  assert found == {'module': True, 'params': True, 'function': False, 'plain': False,
                   'none': False}
  tests = os.path.join(ROOT, 'tests')
  assert shares(os.path.join(tests, 'test_multiprocess.py'))
  assert not shares(os.path.join(tests, 'test_config.py'))
  assert not shares(os.path.join(tests, 'missing.py'))


class _Config:
  """What pytest-xdist's scheduler reads of pytest's config: 2 workers, `--dist load`."""
  rootpath = ROOT

  def getvalue(self, name):
    return {'dist': 'load', 'tx': ['2*popen']}[name]


def test_the_scheduler_keeps_a_shared_fixture_module_whole_and_spreads_the_rest():
  import conftest  # pylint: disable=g-import-not-at-top
  scheduler = conftest.pytest_xdist_make_scheduler(_Config(), None)
  chain = ['tests/test_multiprocess.py::test_sigkill_of_one_process_stops_the_other_naming_it',
           'tests/test_multiprocess.py::test_export_of_a_two_process_checkpoint']
  lone = ['tests/test_config.py::test_every_default_field_with_bad_values[seed-nan-nan]',
          'tests/test_config.py::test_every_default_field_with_bad_values[seed-inf-inf]']
  units = [scheduler._split_scope(nodeid) for nodeid in chain + lone]  # pylint: disable=protected-access
  assert units == ['tests/test_multiprocess.py'] * 2 + lone
