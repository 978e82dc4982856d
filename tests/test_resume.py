"""End to end: train_and_evaluate writes its outputs, and resumes exactly."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from configs import imagenet
from configs import tiny
from moco_jax.core import parallel
from moco_jax.data import batching
from moco_jax import pretrain
from moco_jax.run import checkpoints
from moco_jax.run import stopping
from moco_jax.training import optim
from moco_jax.training import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(steps=6):
  config = tiny.get_config()
  config.num_train_steps = steps
  config.checkpoint_every_steps = steps // 2
  config.log_every_steps = 1
  return config


def _sigkill_after_checkpoint(cmd, workdir, env, steps, checkpoint=4) -> bool:
  """Starts `cmd`, SIGKILLs it once checkpoint `checkpoint` exists; True if it had finished."""
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (workdir / 'checkpoints' / str(checkpoint)).is_dir() and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return (workdir / 'checkpoints' / str(steps)).is_dir()


def _assert_same_state(a, b):
  a, b = jax.device_get(a), jax.device_get(b)
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_train_and_evaluate_writes_checkpoints_and_metrics(tmp_path):
  config = _config()
  state = pretrain.train_and_evaluate(config, str(tmp_path))
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
  return jax.device_get(pretrain.train_and_evaluate(_config(steps=6),
                                                 str(tmp_path_factory.mktemp('straight'))))


def crash_after_checkpoint_and_rerun(config, workdir, monkeypatch, checkpoint: int):
  """Trains until checkpoint `checkpoint` is complete, dies at the next batch, reruns; the final state."""
  real_batches = batching.train_batches

  def crashing_batches(*args, **kwargs):
    for i, batch in enumerate(real_batches(*args, **kwargs)):
      if i == checkpoint + 1:
        deadline = time.time() + 60
        while not (workdir / 'checkpoints' / str(checkpoint)).is_dir() and time.time() < deadline:
          time.sleep(0.1)
        raise KeyboardInterrupt('simulated kill')
      yield batch

  monkeypatch.setattr(batching, 'train_batches', crashing_batches)
  with pytest.raises(KeyboardInterrupt):
    pretrain.train_and_evaluate(config, str(workdir))
  monkeypatch.setattr(batching, 'train_batches', real_batches)
  return pretrain.train_and_evaluate(config, str(workdir))


def test_crash_and_rerun_gives_the_uninterrupted_state(tmp_path, monkeypatch, straight):
  config = _config(steps=6)
  workdir = tmp_path / 'resumed'
  # Serves 4 batches, waits for the step-3 checkpoint to be complete, then dies.
  resumed = crash_after_checkpoint_and_rerun(config, workdir, monkeypatch, checkpoint=3)
  _assert_same_state(straight, resumed)
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
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
  _assert_same_state(straight, pretrain.train_and_evaluate(config, str(tmp_path)))


def test_pre_seam_checkpoint_and_old_config_json_resume_exactly(tmp_path, straight):
  """A run made before the method seam (flat MoCo checkpoint, config.json without the
  fields added since) resumes and ends in the uninterrupted state."""
  config = _config(steps=6)
  pretrain.train_and_evaluate(config, str(tmp_path))
  directory = checkpoints.checkpoint_dir(str(tmp_path))
  state = jax.device_get(_restore_step(tmp_path, config, 3))
  shutil.rmtree(directory)
  key = state.method_state
  legacy = {  # The TrainState of before: one flat record.
      'step': state.step, 'query_params': state.params, 'query_batch_stats': state.batch_stats,
      'key_params': key.key_params, 'key_batch_stats': key.key_batch_stats,
      'opt_state': state.opt_state, 'queue': key.queue, 'queue_ptr': key.queue_ptr,
      'rng': state.rng}
  manager = ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler())
  manager.save(3, args=ocp.args.StandardSave(legacy))
  manager.wait_until_finished()
  manager.close()
  with open(tmp_path / 'config.json') as f:
    saved = json.load(f)
  del saved['method'], saved['model']['head_dims'], saved['optim']['name']
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(saved, f)
  _assert_same_state(straight, pretrain.train_and_evaluate(config, str(tmp_path)))


def _restore_step(workdir, config, step):
  mesh = parallel.make_mesh(jax.devices()[:2])
  lr = optim.create_learning_rate_fn(config, 4, config.num_train_steps)
  tx = optim.create_optimizer(config, lr)
  setup = step_lib.make_step_setup(config, 2, tx)
  target = step_lib.init_state(config, setup, mesh)
  manager = checkpoints.create_manager(str(workdir), config)
  return checkpoints.restore(manager, step, target)


def _restore(workdir, config):
  return _restore_step(workdir, config, config.num_train_steps)


def test_sigkill_and_rerun_gives_the_uninterrupted_state(tmp_path):
  """A real `python main.py` killed with SIGKILL mid-run, then rerun as is."""
  steps = 24
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu')

  def command(workdir):
    return [sys.executable, 'main.py', '--config=configs/tiny.py', f'--workdir={workdir}',
            f'--config.num_train_steps={steps}', '--config.checkpoint_every_steps=2',
            '--config.log_every_steps=1']

  subprocess.run(command(tmp_path / 'straight'), cwd=ROOT, env=env, check=True,
                 capture_output=True, timeout=600)
  killed = tmp_path / 'killed'
  finished_before_kill = _sigkill_after_checkpoint(command(killed), killed, env, steps)
  subprocess.run(command(killed), cwd=ROOT, env=env, check=True, capture_output=True,
                 timeout=600)
  config = tiny.get_config()
  config.num_train_steps = steps
  _assert_same_state(_restore(tmp_path / 'straight', config), _restore(killed, config))
  assert not finished_before_kill, 'the kill came too late to test anything'


def test_on_device_data_reads_the_same_batches_as_the_host_pipeline(tmp_path):
  config = _config(steps=2)
  host = pretrain.train_and_evaluate(config, str(tmp_path / 'host'))
  config.data.on_device = True
  device = pretrain.train_and_evaluate(config, str(tmp_path / 'device'))
  leaves_host, leaves_device = jax.tree.leaves(host), jax.tree.leaves(device)
  for a, b in zip(leaves_host, leaves_device):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _imagenet_tree(root, classes=1000, per_class=2):
  """An ImageNet-layout folder: ROOT/train/n<8 digits>/<i>.JPEG, tiny photos of two shapes."""
  rng = np.random.default_rng(0)
  for c in range(classes):
    folder = root / 'train' / f'n{c:08d}'
    folder.mkdir(parents=True)
    for i in range(per_class):
      small = rng.integers(0, 256, (3, 4, 3) if i % 2 else (4, 3, 3), dtype=np.uint8)
      size = (40, 30) if i % 2 else (30, 40)
      Image.fromarray(small).resize(size, Image.BICUBIC).save(folder / f'{i}.JPEG', quality=90)
  return root


def _imagenet_overrides(tree, cache, steps):
  """configs/imagenet.py with a tiny model, streamed (the decoded-size budget is ~1 MB)."""
  return {'model.name': 'resnet_tiny', 'model.width': 8, 'data.image_size': 32,
          'batch_size': 16, 'moco.queue_size': 64, 'num_train_steps': steps,
          'data.path': str(tree), 'data.cache_dir': str(cache), 'data.max_in_memory_gb': 0.001,
          'data.stream_processes': 0, 'data.num_workers': 2}


@pytest.mark.parametrize('crops', ['device', 'host'])
def test_streaming_imagenet_folder_trains_and_resumes_after_sigkill(tmp_path, crops):
  """`main.py --config=configs/imagenet.py --config.data.path=<1,000-class folder>` streams;
  killed with SIGKILL and rerun, it ends in the uninterrupted run's state. Both streamed
  forms: canvases cropped in the step (the default) and crops cut on the host."""
  steps = 12
  tree = _imagenet_tree(tmp_path / 'imagenet')
  overrides = _imagenet_overrides(tree, tmp_path / 'cache', steps)
  overrides.update({'data.stream_crops': crops, 'data.canvas_side': 48})
  # XLA:CPU's backend optimisations off: ~10x less compile time, the same program in all runs.
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2 '
             '--xla_backend_optimization_level=0')

  def command(workdir):
    return ([sys.executable, 'main.py', '--config=configs/imagenet.py', f'--workdir={workdir}',
             '--config.checkpoint_every_steps=2', '--config.log_every_steps=1'] +
            [f'--config.{k}={v}' for k, v in overrides.items()])

  straight = subprocess.run(command(tmp_path / 'straight'), cwd=ROOT, env=env, check=True,
                            capture_output=True, text=True, timeout=600)
  assert 'streaming it' in straight.stderr and '1000 classes' in straight.stderr
  assert ('cropped on the device' in straight.stderr) == (crops == 'device')
  rows = [json.loads(line) for line in open(tmp_path / 'straight' / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == list(range(1, steps + 1))
  assert all(np.isfinite(r['train_loss']) for r in rows)
  killed = tmp_path / 'killed'
  finished_before_kill = _sigkill_after_checkpoint(command(killed), killed, env, steps)
  rerun = subprocess.run(command(killed), cwd=ROOT, env=env, check=True, capture_output=True,
                         text=True, timeout=600)
  assert 'Using the cached file list' in rerun.stderr
  config = imagenet.get_config()
  for key, value in overrides.items():
    section, _, field = key.rpartition('.')
    (config[section] if section else config)[field] = value
  _assert_same_state(_restore(tmp_path / 'straight', config),
                     _restore(killed, config))
  assert not finished_before_kill, 'the kill came too late to test anything'
