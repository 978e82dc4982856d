"""Issue 18's second catalogue: each case ends in one clear line, the right exit code, nothing lost.

Most checks call the function that decides (fast, in-process); the few that
need a real process (the CLI's one-line output, the many-process start-up)
run `python main.py` with short timeouts.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import helpers
from configs import default
from configs import tiny
from moco_jax import cli
from moco_jax.core import errors
from moco_jax.data import host_crops
from moco_jax.data import sources
from moco_jax.data import spec
from moco_jax.evaluation import knn
from moco_jax.evaluation import results
from moco_jax import config_checks
from moco_jax.run import distributed
from moco_jax.run import guard
from moco_jax.run import run_config
from moco_jax.run import stopping

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def _source(data):
  return sources.open_source(spec.from_config(data))

def _main(args, timeout=60):
  """(exit code, stderr) of `python main.py args` on one CPU device."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3', XLA_FLAGS=helpers.xla_flags())
  proc = subprocess.run([sys.executable, 'main.py', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)
  return proc.returncode, proc.stderr


def _one_error_line(stderr: str, kind: str) -> str:
  """The last line, checked to be the project's one-line error of `kind` with no traceback."""
  assert 'Traceback' not in stderr, stderr[-2000:]
  last = stderr.strip().splitlines()[-1]
  assert last.startswith(f'Error ({kind}): '), stderr[-2000:]
  return last


# --------------------------------------------------------------------------
# Errors and the CLI.


def test_each_user_error_carries_its_kind():
  kinds = {errors.ConfigError: 'config', errors.DataError: 'data',
           errors.DataNotFoundError: 'data', errors.CheckpointError: 'checkpoint',
           errors.CheckpointNotFoundError: 'checkpoint', errors.NonFiniteError: 'diverged',
           errors.DistributedError: 'distributed', errors.UserError: 'input'}
  for error_type, kind in kinds.items():
    assert error_type('x').kind == kind, error_type


@pytest.mark.slow
def test_knn_on_an_empty_workdir_is_one_line_without_the_flag_help(tmp_path):
  rc, stderr = _main(['--mode=knn', f'--workdir={tmp_path}'])
  line = _one_error_line(stderr, 'config')
  assert rc == errors.EXIT_CODE and '--config is required' in line
  assert 'flags:' not in stderr and '--coordinator_address' not in stderr  # No flag help.


@pytest.mark.parametrize('seed', [-1, 2**32])
def test_a_seed_numpy_cannot_take_is_refused(seed):
  config = tiny.get_config()
  config.seed = seed
  with pytest.raises(errors.ConfigError, match=r'config\.seed=.* must be an integer in \[0, 2\^32\)'):
    config_checks.validate(config, num_devices=1)


def test_evaluations_validate_the_config_but_not_the_training_device_count(tmp_path):
  """Every mode validates; a batch that suits the training cluster is not refused because
  the evaluating machine has another device count."""
  config = tiny.get_config()
  config.batch_size, config.moco.queue_size = 64, 64  # Trained on 8 devices, say.
  with pytest.raises(errors.ConfigError, match='not divisible by the 3 devices'):
    config_checks.validate(config, num_devices=3)  # What training on 3 devices would say.
  for mode in ('knn', 'linear_eval', 'export', 'report'):
    cli.validate_for_mode(config, mode, str(tmp_path))
    config.eval.knn_k = 0
    with pytest.raises(errors.ConfigError, match=r'config\.eval\.knn_k=0 must be > 0'):
      cli.validate_for_mode(config, mode, str(tmp_path))
    config.eval.knn_k = 200


# --------------------------------------------------------------------------
# Evaluation inputs: config.json, eval.json, the workdir, knn_k, signals.


def test_a_broken_config_json_names_the_file_and_line(tmp_path):
  (tmp_path / 'config.json').write_text('{\n  "batch_size": 8,\n  "seed": \n}')
  with pytest.raises(errors.ConfigError, match=r'config\.json is not valid JSON \(line 4, column 1'):
    run_config.load_run_config(str(tmp_path))
  (tmp_path / 'config.json').write_text('[1, 2]')
  with pytest.raises(errors.ConfigError, match='holds a JSON list, not a config'):
    run_config.load_run_config(str(tmp_path))


@pytest.mark.slow
def test_a_broken_config_json_is_one_line_from_the_cli(tmp_path):
  (tmp_path / 'config.json').write_text('{"batch_size": 8,')
  rc, stderr = _main(['--mode=knn', f'--workdir={tmp_path}'])
  line = _one_error_line(stderr, 'config')
  assert rc == errors.EXIT_CODE and 'config.json is not valid JSON (line 1' in line


def test_a_broken_eval_json_or_unwritable_workdir_is_found_before_the_work(tmp_path, monkeypatch):
  results.check_before_evaluation(str(tmp_path), 'knn')  # Fine: nothing there yet.
  (tmp_path / 'eval.json').write_text('{"knn_top1": 3,')
  with pytest.raises(errors.CheckpointError, match=r'eval\.json is not valid JSON \(line 1'):
    results.check_before_evaluation(str(tmp_path), 'knn')
  (tmp_path / 'eval.json').write_text('{"knn_top1": 3}')
  results.check_before_evaluation(str(tmp_path), 'knn')
  # Read-only (root ignores permission bits, so the refusal is simulated where it is checked).
  real_access = os.access
  monkeypatch.setattr(os, 'access', lambda path, mode: False if os.path.abspath(path) == str(
      tmp_path) else real_access(path, mode))
  with pytest.raises(errors.CheckpointError, match='no permission to write in .*--mode=linear_eval '
                                                   'writes'):
    results.check_before_evaluation(str(tmp_path), 'linear_eval')
  monkeypatch.setattr(os, 'access', real_access)
  # eval.json as a directory (issue 32): named, before the work.
  (tmp_path / 'eval.json').unlink()
  (tmp_path / 'eval.json').mkdir()
  with pytest.raises(errors.UserError, match=r'eval\.json: it is a directory'):
    results.check_before_evaluation(str(tmp_path), 'knn')


def test_knn_k_larger_than_the_split_is_reported_as_used(caplog):
  assert knn.used_k(200, 1000) == 200
  with caplog.at_level('WARNING'):
    assert knn.used_k(5000, 20) == 20
  assert 'config.eval.knn_k=5000 is larger than the train split (20 images): using k=20' in (
      caplog.text)


@pytest.mark.parametrize('signum, code', [(signal.SIGTERM, 75), (signal.SIGINT, 130)])
def test_an_evaluation_stops_on_a_signal_with_training_s_exit_codes(signum, code):
  before = signal.getsignal(signum)
  with pytest.raises(stopping.EvaluationStopped) as stopped:
    with stopping.StopOnSignal('knn'):
      os.kill(os.getpid(), signum)
      time.sleep(5)  # Interrupted by the handler's exception at once.
  assert stopped.value.exit_code == code
  assert f'Stopped by {signal.Signals(signum).name} during --mode=knn' in str(stopped.value)
  assert isinstance(stopped.value, stopping.Interrupted)  # The CLI's exit path for it.
  assert signal.getsignal(signum) == before  # Handlers restored.


@pytest.mark.slow
def test_sigterm_stops_an_evaluation_process_with_exit_75(tmp_path):
  """`--mode=knn` of the random-init encoder (no checkpoint needed), SIGTERM once it runs."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3', XLA_FLAGS=helpers.xla_flags())
  proc = subprocess.Popen(
      [sys.executable, 'main.py', '--mode=knn', '--config=configs/tiny.py',
       f'--workdir={tmp_path}', '--config.eval.random_init=True'],
      cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  seen = []
  for line in proc.stderr:  # Until the handler is installed (the CLI says so).
    seen.append(line)
    if 'SIGTERM stops it' in line:
      proc.send_signal(signal.SIGTERM)
      break
  rest = proc.communicate(timeout=120)[1]
  stderr = ''.join(seen) + rest
  assert proc.returncode == stopping.EXIT_PREEMPTED, stderr[-2000:]
  assert 'Traceback' not in stderr
  assert 'Stopped by SIGTERM during --mode=knn: nothing was written' in stderr
  assert not (tmp_path / 'eval.json').exists()


def test_loader_processes_are_capped_to_the_usable_cores(monkeypatch, caplog):
  monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1})
  data = default.get_config().data
  data.stream_processes = 32
  with caplog.at_level('WARNING'):
    assert host_crops.loader_workers(spec.from_config(data)) == (2, 1)
  assert 'stream_processes=32 is more than the 2 cores' in caplog.text
  data.stream_processes = -1
  assert host_crops.loader_workers(spec.from_config(data)) == (1, 1)  # One per core but one, for the train loop.
  # Crops on the device: auto decodes in threads of this process (no canvas copied between
  # processes); an explicit count still means worker processes.
  assert host_crops.loader_workers(spec.from_config(data), decode_only=True) == (0, 1)
  data.stream_processes = 2
  assert host_crops.loader_workers(spec.from_config(data), decode_only=True) == (2, 1)
  data.stream_processes = 0
  assert host_crops.loader_workers(spec.from_config(data))[0] == 0


# --------------------------------------------------------------------------
# Checkpoint saves that hit a disk or file-size limit.


class _FailingManager:
  """A CheckpointManager whose background save of the pending step failed with the OS's error."""
  directory = '/ckpt'

  def __init__(self, error):
    self.error = error

  def check_for_errors(self):
    pass  # Orbax notices only when it waits.

  def wait_until_finished(self):
    raise self.error

  def reload(self):
    pass

  def latest_step(self):
    return None


def test_a_failed_save_names_its_step_and_the_os_reason():
  tensorstore_text = ('OUT_OF_RANGE: Error writing "step/0" in OCDBT database at local file '
                      '"/w/checkpoints/2.orbax-checkpoint-tmp/ocdbt.process_0/": Failed writing: '
                      '"/w/checkpoints/2.orbax-checkpoint-tmp/ocdbt.process_0/d/6c9c98505880": '
                      "Failed to write 97753 bytes to file 5: File too large [os_error_code='27']")
  saver = guard.Guard(_FailingManager(ValueError(tensorstore_text)), tiny.get_config())
  saver._pending = 2  # pylint: disable=protected-access
  with pytest.raises(errors.CheckpointError) as failed:
    saver.save(4, {'w': np.zeros(3, np.float32)})
  message = str(failed.value)
  assert 'Saving the checkpoint of step 2 to /ckpt failed (noticed at step 4): File too large ' \
         '(errno 27)' in message
  assert 'No checkpoint was saved yet' in message and 'ulimit -f' in message
  assert guard.save_failure_reason(OSError(28, 'No space left on device')).startswith(
      'No space left on device (errno 28)')


# --------------------------------------------------------------------------
# A streamed resume reads the file list the run started with.


def _tree(root, count):
  """ROOT/train/c0, c1: `count` PNGs, half in each class (a second call adds files)."""
  helpers.image_tree(root, {'train': count // 2}, classes=2, size=(20, 20), class_name='c{}',
                     ext='png')


def test_a_streamed_resume_refuses_a_changed_file_list(tmp_path, caplog):
  data = default.get_config().data
  data.update(path=str(tmp_path / 'data'), cache_dir=str(tmp_path / 'cache'), image_size=16,
              max_in_memory_gb=0.0)
  _tree(tmp_path / 'data', 8)
  workdir = tmp_path / 'run'
  workdir.mkdir()
  config = tiny.get_config()
  first = _source(data).open('train').fingerprint()
  guard.check_file_list(str(workdir), first, 0, config)  # The run starts: accepted,
  guard.record_file_list(str(workdir), first)  # then recorded.
  assert json.loads((workdir / guard.FILE_LIST).read_text())['count'] == 8
  guard.check_file_list(str(workdir), first, 4, config)  # Same list: resumes.
  time.sleep(0.01)  # A new mtime for the class directory.
  _tree(tmp_path / 'data', 10)  # Two files added between the run and its resume.
  changed = _source(data).open('train').fingerprint()
  with pytest.raises(errors.CheckpointError,
                     match=r'Refusing to resume from step 4: the streamed file list of .* changed '
                           r'\(8 files when the run started, 10 now.*allow_config_change=True'):
    guard.check_file_list(str(workdir), changed, 4, config)
  config.allow_config_change = True
  with caplog.at_level('WARNING'):
    guard.check_file_list(str(workdir), changed, 4, config)
  assert 'changed file list' in caplog.text
  guard.record_file_list(str(workdir), changed)  # Accepted: recorded.
  assert json.loads((workdir / guard.FILE_LIST).read_text())['count'] == 10  # The new list.


# --------------------------------------------------------------------------
# Many processes: every failed start is one line naming the flags, in time.


def test_cluster_flags_that_cannot_work_are_refused_before_jax_distributed():
  with pytest.raises(errors.DistributedError, match=r'--process_id=2 is out of range for '
                                                    r'--num_processes=2: .* 0\.\.1'):
    distributed.check_cluster_flags('127.0.0.1:1234', 2, 2)
  with pytest.raises(errors.DistributedError, match='--process_id=-1 is out of range'):
    distributed.check_cluster_flags('127.0.0.1:1234', 2, -1)
  with pytest.raises(errors.DistributedError, match='--num_processes=0 must be >= 1'):
    distributed.check_cluster_flags('127.0.0.1:1234', 0, 0)
  with pytest.raises(errors.DistributedError, match="--coordinator_address='localhost' is not "
                                                    'host:port'):
    distributed.check_cluster_flags('localhost', 2, 1)
  with socket.socket() as busy:
    busy.bind(('127.0.0.1', 0))
    busy.listen()
    port = busy.getsockname()[1]
    with pytest.raises(errors.DistributedError, match=f'port {port} is already in use'):
      distributed.check_cluster_flags(f'127.0.0.1:{port}', 2, 0)
    distributed.check_cluster_flags(f'127.0.0.1:{port}', 2, 1)  # Only process 0 serves it.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_a_cluster_that_does_not_form_ends_in_one_line_on_every_process(tmp_path):
  """Process 0 without its peer, and a process 1 whose coordinator is not there: both end
  in one line naming the flags at --initialization_timeout (jax's own ending is a C++ abort)."""
  timeout = 4
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3', XLA_FLAGS=helpers.xla_flags())
  common = ['--config=configs/tiny.py', '--num_processes=2',
            f'--initialization_timeout={timeout}']
  runs = {
      'missing process': [f'--coordinator_address=127.0.0.1:{_free_port()}', '--process_id=0',
                          f'--workdir={tmp_path / "a"}'],
      'no coordinator': [f'--coordinator_address=127.0.0.1:{_free_port()}', '--process_id=1',
                         f'--workdir={tmp_path / "b"}'],
  }
  start = time.monotonic()
  procs = {name: subprocess.Popen([sys.executable, 'main.py', *common, *args], cwd=ROOT, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for name, args in runs.items()}
  outputs = {name: proc.communicate(timeout=120) for name, proc in procs.items()}
  elapsed = time.monotonic() - start
  for name, proc in procs.items():
    assert proc.returncode == errors.EXIT_CODE, (name, outputs[name][1][-2000:])
    line = _one_error_line(outputs[name][1], 'distributed')
    assert '--coordinator_address=127.0.0.1:' in line and '--num_processes=2' in line, line
  assert 'not every process connected' in _one_error_line(outputs['missing process'][1],
                                                          'distributed')
  assert 'nothing answers at --coordinator_address' in _one_error_line(
      outputs['no coordinator'][1], 'distributed')
  # Start-up (imports) plus the timeout; jax's own C++ timeout is 60 s later.
  assert elapsed < timeout + 50, elapsed
