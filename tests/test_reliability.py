"""Bad inputs end in one clear message; no checkpoint is poisoned or lost; nothing hangs.

Every test uses real files (images, archives, checkpoints, workdirs) made in
tmp_path; the training runs are the tiny config for a few steps.
"""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

import helpers
from configs import tiny
from moco_jax.core import errors
from moco_jax.data import batching
from moco_jax.data import decode
from moco_jax.data import sources
from moco_jax.data import spec
from moco_jax.data import streaming
from moco_jax import pretrain
from moco_jax.run import checkpoints
from moco_jax.run import guard
from moco_jax.run import metrics_writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------
# Images: 16-bit and float files, stray files, truncated archives, tfds names.


def _png16() -> bytes:
  """A full-range 16-bit grayscale PNG: a horizontal ramp 0..65535."""
  ramp = np.tile(np.linspace(0, 65535, 48), (48, 1)).astype(np.uint16)
  buf = io.BytesIO()
  Image.fromarray(ramp).save(buf, format='PNG')
  assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith('I')
  return buf.getvalue()


def _float_tiff() -> bytes:
  """A float32 TIFF with values in [0, 1]: the same ramp."""
  ramp = np.tile(np.linspace(0, 1, 48), (48, 1)).astype(np.float32)
  buf = io.BytesIO()
  Image.fromarray(ramp).save(buf, format='TIFF')
  assert Image.open(io.BytesIO(buf.getvalue())).mode == 'F'
  return buf.getvalue()


def _rgb_png(seed: int, side: int = 40) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format='PNG')
  return buf.getvalue()


@pytest.mark.parametrize('make', [_png16, _float_tiff])
def test_high_bit_depth_and_float_images_keep_their_range(make):
  image = decode.decode_image(make(), 32)
  assert image.shape == (32, 32, 3)
  row = image[16, :, 0].astype(int)
  # A ramp from black to white: not all white (16-bit clipped) nor all black (float clipped).
  assert row[0] < 15 and row[-1] > 240, row
  assert 110 < image.mean() < 145
  assert np.all(np.diff(row) >= 0)


def _tree(root, with_strays=True):
  """ROOT/top/train/<a,b>/ with a 16-bit PNG and a float TIFF among the images."""
  for c, cls in enumerate(('a', 'b')):
    folder = root / 'top' / 'train' / cls
    folder.mkdir(parents=True)
    for i in range(3):
      (folder / f'{i}.png').write_bytes(_rgb_png(10 * c + i))
  (root / 'top' / 'train' / 'a' / 'ramp16.png').write_bytes(_png16())
  (root / 'top' / 'train' / 'b' / 'ramp.tif').write_bytes(_float_tiff())
  if with_strays:
    (root / 'top' / 'train' / 'README.txt').write_text('class folders beside me')
    (root / 'top' / 'LICENSE').write_text('CC')
    (root / 'top' / 'train' / 'a' / 'notes.txt').write_text('not an image')
  return root


def _source(data):
  return sources.open_source(spec.from_config(data))


def _data(path, tmp_path):
  return helpers.data_config(path, cache_dir=str(tmp_path / 'cache'))


def test_stray_files_are_ignored_and_counted_in_trees_and_archives(tmp_path, caplog):
  root = _tree(tmp_path / 'src')
  archive = tmp_path / 'strays.tgz'
  with tarfile.open(archive, 'w:gz') as tar:
    tar.add(root / 'top', arcname='top')
  for path in (root, archive):
    caplog.clear()
    ds = _source(_data(path, tmp_path)).load('train')
    assert len(ds) == 8 and ds.class_names == ['a', 'b']
    messages = ' '.join(r.getMessage() for r in caplog.records)
    assert 'Ignored 2 files' in messages and 'README.txt' in messages, messages
    assert 'Skipped 1 of 9 files' in messages, messages  # notes.txt in a class folder.
    # The 16-bit PNG and the float TIFF decoded to their ramps.
    means = sorted(float(ds.images[i].mean()) for i in range(len(ds)))
    assert all(m > 60 for m in means), means


def test_truncated_archive_names_its_path(tmp_path):
  root = _tree(tmp_path / 'src', with_strays=False)
  archive = tmp_path / 'cut.tgz'
  with tarfile.open(archive, 'w:gz') as tar:
    tar.add(root / 'top', arcname='top')
  data = archive.read_bytes()
  archive.write_bytes(data[:len(data) // 2])
  with pytest.raises(errors.DataError, match=r'cut\.tgz.*truncated or corrupt'):
    _source(_data(archive, tmp_path)).load('train')


def test_typo_in_a_tfds_name_is_one_line(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  config = _data('', tmp_path)
  config.update(source='tfds', name='cifar1O', data_dir=str(tmp_path))
  with pytest.raises(errors.DataError, match="data.name='cifar1O'.*did you mean 'cifar10'") as e:
    _source(config).load('train')
  assert '\n' not in str(e.value)
  with pytest.raises(errors.DataError, match="did you mean 'cifar10'"):  # What train calls first.
    streaming.plan(_source(config))
  config.name = 'imagenette/160px-v2'
  with pytest.raises(errors.DataNotFoundError, match='is not prepared'):
    streaming.plan(_source(config))


# --------------------------------------------------------------------------
# Guards without training.


def test_workdir_that_cannot_be_written_fails_at_start(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  with pytest.raises(errors.CheckpointError, match=r'a_file/run is not a writable directory: .*'
                                                   r'a_file is a file, not a directory'):
    guard.check_writable(str(blocker / 'run'))
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'checkpoints').write_text('')  # Not a directory.
  with pytest.raises(errors.CheckpointError, match=r'run/checkpoints is not a writable directory: .*'
                                                   r'run/checkpoints is a file'):
    guard.check_writable(str(workdir))


def test_state_check_sees_one_nan_or_explosion_anywhere():
  tree = {'a': np.ones((3, 4), np.float32), 'b': {'c': np.zeros(5, np.float32)},
          'step': np.int32(3)}
  assert guard.all_finite(tree)
  assert guard.max_abs(tree) == 1.0
  tree['b']['c'][2] = -3e9
  assert guard.all_finite(tree) and guard.max_abs(tree) == 3e9 > guard.MAX_ABS
  tree['b']['c'][2] = np.nan
  assert not guard.all_finite(tree)


def test_failed_background_save_surfaces_at_the_next_step(tmp_path):
  class Manager:
    directory = str(tmp_path / 'checkpoints')

    def check_for_errors(self):
      raise OSError(28, 'No space left on device')

    def wait_until_finished(self):
      pass

    def reload(self):
      pass

    def latest_step(self):
      return 2

  saver = guard.Guard(Manager(), tiny.get_config())
  saver.poll(3)  # Nothing saved yet: nothing to check.
  saver._pending = 4  # pylint: disable=protected-access
  with pytest.raises(errors.CheckpointError,
                     match=r'step 4 .* failed \(noticed at step 5\).*No space left.*step 2'):
    saver.poll(5)


def test_metrics_rows_after_the_resumed_step_are_dropped(tmp_path):
  writer = metrics_writer.MetricsWriter(str(tmp_path), tensorboard=False)
  for step in (1, 2, 3, 4):
    writer.write(step, {'train_loss': 1.0}, quiet=True)
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 5, "train_lo')  # A killed run's half line.
  writer.drop_rows_after(2)
  assert [json.loads(l)['step'] for l in open(tmp_path / 'metrics.jsonl')] == [1, 2]


# --------------------------------------------------------------------------
# Training runs: resume refusals, corrupt checkpoints, divergence, failing saves.


def _config(steps=4, **overrides):
  return helpers.tiny_config(**dict(dict(num_train_steps=steps, checkpoint_every_steps=2,
                                         log_every_steps=1, tensorboard=False), **overrides))


def _saved_steps(workdir):
  return checkpoints.checkpoint_steps(str(workdir))


def _restored(workdir, step):
  manager = ocp.CheckpointManager(checkpoints.checkpoint_dir(str(workdir)),
                                  item_handlers=ocp.StandardCheckpointHandler())
  try:
    return manager.restore(step, args=ocp.args.StandardRestore())
  finally:
    manager.close()


def _corrupt(step_dir):
  """Overwrites every array data file of a checkpoint with garbage (same sizes)."""
  count = 0
  for dirpath, _, filenames in os.walk(step_dir):
    for name in filenames:
      path = os.path.join(dirpath, name)
      if os.sep + 'd' + os.sep in path + os.sep and os.path.basename(dirpath) == 'd':
        size = os.path.getsize(path)
        with open(path, 'wb') as f:
          f.write(b'\x00garbage' * (size // 8 + 1))
        count += 1
  assert count


@pytest.mark.slow
def test_resume_safety_end_to_end(tmp_path, caplog):
  workdir = tmp_path / 'run'
  first = jax.device_get(pretrain.train_and_evaluate(_config(), str(workdir)))
  assert _saved_steps(workdir) == [2, 4]
  config_json = (workdir / 'config.json').read_text()

  # A corrupt latest checkpoint: warned about, moved aside (nothing deleted), and the
  # run resumes from step 2 to the same final state; metrics keep one row per step.
  _corrupt(workdir / 'checkpoints' / '4')
  resumed = jax.device_get(pretrain.train_and_evaluate(_config(), str(workdir)))
  assert 'does not restore' in caplog.text
  assert os.path.isdir(workdir / 'checkpoints_corrupt' / '4')
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  rows = [json.loads(line)['step'] for line in open(workdir / 'metrics.jsonl')]
  assert rows == [1, 2, 3, 4]

  # A config that changes what the checkpoint means is refused before any work, and
  # config.json is left as it was.
  with pytest.raises(errors.CheckpointError,
                     match=r'batch_size: 64 -> 32.*moco.queue_size: 200 -> 256.*allow_config_change'):
    pretrain.train_and_evaluate(_config(batch_size=32, moco__queue_size=256), str(workdir))
  assert (workdir / 'config.json').read_text() == config_json

  # num_train_steps below the checkpoint's step: a clear error, not a silent exit.
  with pytest.raises(errors.ConfigError, match=r'at step 4, beyond the 2 steps'):
    pretrain.train_and_evaluate(_config(steps=2), str(workdir))

  # Divergence: the run stops naming the last checkpoint; nothing non-finite is saved.
  with pytest.raises(errors.NonFiniteError, match=r'training diverged') as info:
    pretrain.train_and_evaluate(_config(steps=8, optim__base_lr=1e9), str(workdir))
  message = str(info.value)
  kept = int(message.split('The last checkpoint, step ')[1].split()[0])
  diverged = int(message.split(': training diverged')[0].rsplit('step ', 1)[1])
  assert kept == max(_saved_steps(workdir)) and 4 <= kept < diverged, message
  for step in _saved_steps(workdir):
    assert guard.max_abs(_restored(workdir, step)) < guard.MAX_ABS, step
  # The rerun with a sane learning rate resumes from the finite checkpoint.
  state = pretrain.train_and_evaluate(_config(steps=8), str(workdir))
  assert int(state.step) == 8 and guard.all_finite(state)
  assert [json.loads(line)['step'] for line in open(workdir / 'metrics.jsonl')] == list(
      range(1, 9))


def test_unwritable_checkpoints_mid_run_fail_at_once_not_hang(tmp_path, monkeypatch):
  workdir = tmp_path / 'run'
  real = batching.train_batches

  def breaking(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs)):
      if i == 3:  # After the step-2 save: the directory goes away (disk unmounted, ...).
        deadline = time.time() + 60
        while not (workdir / 'checkpoints' / '2').is_dir() and time.time() < deadline:
          time.sleep(0.05)
        shutil.move(workdir / 'checkpoints', workdir / 'moved')
        (workdir / 'checkpoints').write_text('')
      yield batch

  monkeypatch.setattr(batching, 'train_batches', breaking)
  start = time.time()
  with pytest.raises(errors.CheckpointError,
                     match=r'Saving the checkpoint of step 4 to .*checkpoints failed'):
    pretrain.train_and_evaluate(_config(), str(workdir))
  assert time.time() - start < 120
  assert os.path.isdir(workdir / 'moved' / '2')  # The earlier checkpoint is intact.


# --------------------------------------------------------------------------
# The command line: one message, non-zero exit, no traceback.


def _main(*args):
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(8),
             JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, 'main.py', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('args,needle', [
    (['--config.moco.queue=4'], "no field 'queue'; did you mean --config.moco.queue_size?"),
    (['--config.eval.knn_k=0'], 'Error (config): config.eval.knn_k=0 must be > 0'),
    (['--config.data.path=/nonexistent/imagenette.tgz'],
     "Error (data): data.path='/nonexistent/imagenette.tgz' does not exist"),
])
@pytest.mark.slow
def test_cli_errors_are_one_message_and_exit_2(tmp_path, args, needle):
  result = _main('--config=configs/tiny.py', f'--workdir={tmp_path}', *args)
  assert result.returncode == errors.EXIT_CODE, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert needle in last, result.stderr[-2000:]
  assert not checkpoints.checkpoint_steps(str(tmp_path))  # Failed before any step.
  if 'knn_k' in args[0]:  # The traceback is one flag away.
    verbose = _main('--config=configs/tiny.py', f'--workdir={tmp_path}', *args, '--verbose')
    assert verbose.returncode == errors.EXIT_CODE and 'Traceback' in verbose.stderr
