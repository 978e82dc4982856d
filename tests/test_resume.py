"""End to end: train_and_evaluate writes its outputs, and resumes exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import tiny
from moco_jax import checkpoints
from moco_jax import input_pipeline
from moco_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(steps=6):
  config = tiny.get_config()
  config.num_train_steps = steps
  config.checkpoint_every_steps = steps // 2
  config.log_every_steps = 1
  return config


def _assert_same_state(a, b):
  a, b = jax.device_get(a), jax.device_get(b)
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_train_and_evaluate_writes_checkpoints_and_metrics(tmp_path):
  config = _config()
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 6
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3', '6']
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [1, 2, 3, 4, 5, 6]
  for key in ('step', 'epoch', 'train_loss', 'learning_rate', 'images_per_sec', 'eta_sec'):
    assert key in rows[-1], key
  assert all(np.isfinite(r['train_loss']) for r in rows)
  # The first loss is InfoNCE against a random queue: near log(K + 1) or below.
  assert rows[0]['train_loss'] < np.log(config.moco.queue_size + 1) + 0.5
  saved = json.load(open(tmp_path / 'config.json'))
  assert saved['moco']['queue_size'] == config.moco.queue_size
  assert any(f.startswith('events') for f in os.listdir(tmp_path / 'tensorboard'))


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """The final state of an uninterrupted 6-step run."""
  return jax.device_get(train.train_and_evaluate(_config(steps=6),
                                                 str(tmp_path_factory.mktemp('straight'))))


def test_crash_and_rerun_gives_the_uninterrupted_state(tmp_path, monkeypatch, straight):
  config = _config(steps=6)

  workdir = tmp_path / 'resumed'
  real_batches = input_pipeline.train_batches

  def crashing_batches(*args, **kwargs):
    """Serves 4 batches, waits for the step-3 checkpoint to be complete, then dies."""
    for i, batch in enumerate(real_batches(*args, **kwargs)):
      if i == 4:
        deadline = time.time() + 60
        while not (workdir / 'checkpoints' / '3').is_dir() and time.time() < deadline:
          time.sleep(0.1)
        raise KeyboardInterrupt('simulated kill')
      yield batch

  monkeypatch.setattr(input_pipeline, 'train_batches', crashing_batches)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(workdir))
  monkeypatch.setattr(input_pipeline, 'train_batches', real_batches)
  resumed = train.train_and_evaluate(config, str(workdir))
  _assert_same_state(straight, resumed)
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  # The rerun started from the checkpoint at step 3, not from scratch.
  assert [r['step'] for r in rows][-3:] == [4, 5, 6]
  assert [r['step'] for r in rows].count(1) == 1


def test_sigterm_saves_the_current_step_and_rerun_continues(tmp_path, monkeypatch, straight):
  config = _config(steps=6)
  real_batches = input_pipeline.train_batches

  def terminated_batches(*args, **kwargs):
    for i, batch in enumerate(real_batches(*args, **kwargs)):
      if i == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # Arrives while step 2 is being built.
      yield batch

  monkeypatch.setattr(input_pipeline, 'train_batches', terminated_batches)
  handler_before = signal.getsignal(signal.SIGTERM)
  stopped = train.train_and_evaluate(config, str(tmp_path))
  assert signal.getsignal(signal.SIGTERM) is handler_before  # The run restores it.
  assert int(stopped.step) == 2  # Not a checkpoint_every_steps multiple: saved on SIGTERM.
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2']
  monkeypatch.setattr(input_pipeline, 'train_batches', real_batches)
  _assert_same_state(straight, train.train_and_evaluate(config, str(tmp_path)))
