"""End to end: train_and_evaluate writes its outputs, and resumes exactly."""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import helpers
import rounding
from configs import imagenet
from moco_jax.data import batching
from moco_jax import pretrain
from moco_jax.run import checkpoints
from moco_jax.run import stopping

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(steps=6):
  return helpers.tiny_config(num_train_steps=steps, checkpoint_every_steps=steps // 2,
                             log_every_steps=1)


def test_train_and_evaluate_writes_checkpoints_and_metrics(tmp_path):
  config = _config()
  state = pretrain.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 6
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3', '6']
  rows = helpers.read_jsonl(tmp_path / 'metrics.jsonl')
  assert [r['step'] for r in rows] == [1, 2, 3, 4, 5, 6]
  for key in ('step', 'epoch', 'train_loss', 'learning_rate', 'images_per_sec', 'eta_sec'):
    assert key in rows[-1], key
  assert all(np.isfinite(r['train_loss']) for r in rows)
  # The first loss is InfoNCE against a random queue: near log(K + 1) or below.
  assert rows[0]['train_loss'] < np.log(config.moco.queue_size + 1) + 0.5
  saved = json.load(open(tmp_path / 'config.json'))
  assert saved['moco']['queue_size'] == config.moco.queue_size
  assert any(f.startswith('events') for f in os.listdir(tmp_path / 'tensorboard'))


def test_a_one_process_save_compiles_nothing_and_restores_exactly(tmp_path):
  """A replicated state on 8 devices is written whole (moco_jax/run/checkpoints.py): Orbax's
  replica-parallel default compiled a slice program per leaf and device at the first save."""
  config = _config()
  state = jax.block_until_ready(helpers.fresh_state(config))
  compiled = []

  def listen(event, secs, **kwargs):
    del secs, kwargs
    if event == '/jax/core/compile/backend_compile_duration':
      compiled.append(event)

  jax.monitoring.register_event_duration_secs_listener(listen)
  manager = checkpoints.create_manager(str(tmp_path), config)
  try:
    checkpoints.save(manager, 1, state)
    manager.wait_until_finished()
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  try:
    assert compiled == []
    helpers.assert_same_state(jax.device_get(checkpoints.restore(manager, 1, state)),
                              jax.device_get(state))
  finally:
    manager.close()


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """The final state of an uninterrupted 6-step run."""
  return jax.device_get(pretrain.train_and_evaluate(_config(steps=6),
                                                 str(tmp_path_factory.mktemp('straight'))))


def test_crash_and_rerun_gives_the_uninterrupted_state(tmp_path, monkeypatch, straight):
  config = _config(steps=6)
  workdir = tmp_path / 'resumed'
  # Serves 4 batches, waits for the step-3 checkpoint to be complete, then dies.
  resumed = helpers.crash_after_checkpoint_and_rerun(config, workdir, monkeypatch, checkpoint=3)
  helpers.assert_same_state(straight, resumed)
  rows = helpers.read_jsonl(workdir / 'metrics.jsonl')
  # The rerun started from the checkpoint at step 3, not from scratch.
  assert [r['step'] for r in rows][-3:] == [4, 5, 6]
  assert [r['step'] for r in rows].count(1) == 1


def test_sigterm_saves_the_current_step_and_rerun_continues(tmp_path, monkeypatch, straight):
  config = _config(steps=6)
  real_batches = batching.train_batches

  def terminated_batches(*args, **kwargs):
    for i, batch in enumerate(real_batches(*args, **kwargs)):
      if i == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # Arrives while step 2 is being built.
      yield batch

  monkeypatch.setattr(batching, 'train_batches', terminated_batches)
  handler_before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(stopping.Interrupted) as stopped:
    pretrain.train_and_evaluate(config, str(tmp_path))
  assert signal.getsignal(signal.SIGTERM) is handler_before  # The run restores it.
  # Step 2, the next step boundary (not a checkpoint_every_steps multiple): saved on SIGTERM.
  assert stopped.value.step == 2 and stopped.value.saved
  assert stopped.value.exit_code == stopping.EXIT_PREEMPTED == 75
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2']
  monkeypatch.setattr(batching, 'train_batches', real_batches)
  helpers.assert_same_state(straight, pretrain.train_and_evaluate(config, str(tmp_path)))


@pytest.mark.slow
def test_an_old_config_json_resumes_exactly(tmp_path, straight):
  """A run whose config.json lacks the fields added since (method, head_dims, optim.name)
  resumes from its checkpoint with their defaults and ends in the uninterrupted state."""
  config = _config(steps=6)
  pretrain.train_and_evaluate(config, str(tmp_path))
  shutil.rmtree(os.path.join(checkpoints.checkpoint_dir(str(tmp_path)), '6'))
  with open(tmp_path / 'config.json') as f:
    saved = json.load(f)
  del saved['method'], saved['model']['head_dims'], saved['optim']['name']
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(saved, f)
  helpers.assert_same_state(straight, pretrain.train_and_evaluate(config, str(tmp_path)))


def _restore(workdir, config):
  return helpers.restore_checkpoint(workdir, config, config.num_train_steps,
                                    devices=jax.devices()[:2])


@pytest.mark.slow
def test_sigkill_and_rerun_gives_the_uninterrupted_state(tmp_path):
  """A real `python main.py` killed with SIGKILL mid-run, then rerun as is."""
  steps = 8
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(2),
             JAX_PLATFORMS='cpu')

  def command(workdir):
    return [sys.executable, 'main.py', '--config=configs/tiny.py', f'--workdir={workdir}',
            f'--config.num_train_steps={steps}', '--config.checkpoint_every_steps=2',
            '--config.log_every_steps=1']

  subprocess.run(command(tmp_path / 'straight'), cwd=ROOT, env=env, check=True,
                 capture_output=True, timeout=600)
  killed = tmp_path / 'killed'
  finished_before_kill = helpers.sigkill_after_checkpoint(command(killed), killed, env, steps)
  subprocess.run(command(killed), cwd=ROOT, env=env, check=True, capture_output=True,
                 timeout=600)
  config = helpers.tiny_config(num_train_steps=steps)
  helpers.assert_same_state(_restore(tmp_path / 'straight', config), _restore(killed, config))
  assert not finished_before_kill, 'the kill came too late to test anything'


@pytest.mark.slow
def test_on_device_data_reads_the_same_batches_as_the_host_pipeline(tmp_path):
  """Two programs (augmentation in the step or before it) that XLA fuses and rounds differently:
  both in float64, within tests/rounding.py's bound; a batch read in another order or with
  other crops would be 1e5 times that."""
  config = _config(steps=2)
  config.data.image_size = rounding.IMAGE_SIZE
  with rounding.precise(config) as config:
    host = jax.device_get(pretrain.train_and_evaluate(config, str(tmp_path / 'host')))
    config.data.on_device = True
    device = jax.device_get(pretrain.train_and_evaluate(config, str(tmp_path / 'device')))
  rounding.assert_agree_to_rounding(device, host, 'on-device data vs the host pipeline')


def _imagenet_overrides(tree, cache, steps):
  """configs/imagenet.py with a tiny model, streamed (the decoded-size budget is ~1 MB)."""
  return {'model.name': 'resnet_tiny', 'model.width': 8, 'data.image_size': 32,
          'batch_size': 16, 'moco.queue_size': 64, 'num_train_steps': steps,
          'data.path': str(tree), 'data.cache_dir': str(cache), 'data.max_in_memory_gb': 0.001,
          'data.stream_processes': 0, 'data.num_workers': 2}


@pytest.mark.slow
@pytest.mark.parametrize('crops', ['device', 'host'])
def test_streaming_imagenet_folder_trains_and_resumes_after_sigkill(tmp_path, crops):
  """`main.py --config=configs/imagenet.py --config.data.path=<1,000-class folder>` streams;
  killed with SIGKILL and rerun, it ends in the uninterrupted run's state. Both streamed
  forms: canvases cropped in the step (the default) and crops cut on the host."""
  steps = 8
  # An ImageNet-layout folder: train/n<8 digits>/<i>.JPEG, 1,000 classes of 2 tiny photos.
  tree = helpers.image_tree(tmp_path / 'imagenet', {'train': 2}, classes=1000,
                            class_name='n{:08d}', ext='JPEG')
  overrides = _imagenet_overrides(tree, tmp_path / 'cache', steps)
  overrides.update({'data.stream_crops': crops, 'data.canvas_side': 48})
  # XLA's backend optimisations stay off (JAX_DISABLE_MOST_OPTIMIZATIONS, tests/conftest.py).
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=helpers.xla_flags(2))

  def command(workdir):
    return ([sys.executable, 'main.py', '--config=configs/imagenet.py', f'--workdir={workdir}',
             '--config.checkpoint_every_steps=2', '--config.log_every_steps=1'] +
            [f'--config.{k}={v}' for k, v in overrides.items()])

  straight = subprocess.run(command(tmp_path / 'straight'), cwd=ROOT, env=env, check=True,
                            capture_output=True, text=True, timeout=600)
  assert 'streaming it' in straight.stderr and '1000 classes' in straight.stderr
  rows = helpers.read_jsonl(tmp_path / 'straight' / 'metrics.jsonl')
  assert [r['step'] for r in rows] == list(range(1, steps + 1))
  assert all(np.isfinite(r['train_loss']) for r in rows)
  killed = tmp_path / 'killed'
  finished_before_kill = helpers.sigkill_after_checkpoint(command(killed), killed, env, steps)
  rerun = subprocess.run(command(killed), cwd=ROOT, env=env, check=True, capture_output=True,
                         text=True, timeout=600)
  assert 'Using the cached file list' in rerun.stderr
  config = helpers.override(imagenet.get_config(),
                            **{k.replace('.', '__'): v for k, v in overrides.items()})
  helpers.assert_same_state(_restore(tmp_path / 'straight', config),
                     _restore(killed, config))
  assert not finished_before_kill, 'the kill came too late to test anything'
