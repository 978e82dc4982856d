"""Stopping a run: Ctrl-C and SIGTERM save the step reached and exit with a distinct code."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import helpers
from moco_jax import pretrain
from moco_jax.run import run_config
from moco_jax.run import stopping

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_first_sigint_asks_for_a_stop_and_a_second_one_kills():
  before = signal.getsignal(signal.SIGINT)
  with stopping.StopWatcher() as watcher:
    assert not watcher.stopped
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)  # The Python-level handler runs at the next bytecode.
    assert watcher.stopped and watcher.signum == signal.SIGINT
    assert watcher.requested(manager=None, step=3)
    # The next Ctrl-C gets the default action: the process dies at once, even inside XLA.
    assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
  assert signal.getsignal(signal.SIGINT) is before


def test_exit_codes_and_message():
  e = stopping.Interrupted(signal.SIGINT, 12, saved=True, directory='/w/checkpoints')
  assert e.exit_code == 130 and 'SIGINT' in str(e) and 'saved step 12 in /w/checkpoints' in str(e)
  assert stopping.Interrupted(signal.SIGTERM, 3, saved=True).exit_code == 75


def _rows(workdir):
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_ctrl_c_on_main_py_saves_the_step_and_the_run_resumes_from_its_own_config(tmp_path):
  """A real `python main.py`: SIGINT mid-run -> exit 130, step saved, resume command printed;
  then the run's own config.json (plus an override) finishes it from the saved step."""
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(2),
             JAX_PLATFORMS='cpu')
  workdir = tmp_path / 'run'
  command = [sys.executable, 'main.py', '--config=configs/tiny.py', f'--workdir={workdir}',
             '--config.num_train_steps=1000', '--config.checkpoint_every_steps=1000',
             '--config.log_every_steps=1']
  proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while len(_rows(workdir)) < 2 and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  output, _ = proc.communicate(timeout=300)
  assert proc.returncode == stopping.EXIT_INTERRUPTED, output
  saved = [int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit()]
  assert len(saved) == 1 and 2 <= saved[0] < 1000, (saved, output)
  assert f'saved step {saved[0]}' in output and 'To resume, run the same command' in output
  assert '--config.num_train_steps=1000' in output.split('To resume')[-1]
  assert 'Traceback' not in output

  # The run's own config.json with one override (what `main.py --workdir=DIR
  # --config.num_train_steps=N` loads: tests/test_run_config.py) finishes the run from there.
  config = run_config.load_run_config(str(workdir), {'num_train_steps': saved[0] + 2})
  state = pretrain.train_and_evaluate(config, str(workdir))
  assert int(state.step) == saved[0] + 2
  assert [r['step'] for r in _rows(workdir)][-2:] == [saved[0] + 1, saved[0] + 2]
