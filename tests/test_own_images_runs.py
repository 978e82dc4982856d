"""Your own images end to end: each kind trains (1 vs 8 devices, in memory and streamed),
resumes after SIGKILL bit for bit, and goes through report, embed and export with main.py."""

import csv
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from moco_jax.core import errors
from moco_jax.core import parallel
from moco_jax.data import normalisation
from moco_jax.data import sources
from moco_jax.evaluation import features
from moco_jax.evaluation import knn
from moco_jax.training import step as step_lib
from moco_jax.evaluation import frozen
from tests import own_images
from tests import rounding
from tests import test_mechanisms
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
# Each test runs main.py end to end or trains several times: all in the full suite only.
pytestmark = pytest.mark.slow

# XLA's backend optimisations stay off in the runs (JAX_DISABLE_MOST_OPTIMIZATIONS, tests/conftest.py).
ENV = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=helpers.xla_flags(2))


@pytest.mark.parametrize('kind', own_images.KINDS)
def test_one_and_eight_devices_agree_on_each_kind(tmp_path, kind):
  """The first step on a batch of the kind's images: 1 device and 8 agree to float64 rounding."""
  config = test_mechanisms._config('end_to_end', end_to_end__bn_mode='shuffle')
  config.data.source = 'folder'
  config.data.path = own_images.make(kind, tmp_path / kind)
  config.data.cache_dir = str(tmp_path / 'cache')
  config.data.image_size = 16
  config.batch_size = 16
  own_images.apply(kind, config)
  normalisation.resolve(config)
  runs = []
  with rounding.precise(config):
    for devices in (jax.devices()[:1], jax.devices()):
      mesh = parallel.make_mesh(devices)
      images, indices, n = test_mechanisms._images_and_indices(config, 0)
      setup, lr, state = test_mechanisms._setup(config, len(devices), n)
      step = step_lib.make_sharded_step(setup, lr, mesh)
      state, metrics = step(parallel.replicate(state, mesh), parallel.shard_batch(images, mesh),
                            parallel.shard_batch(indices, mesh))
      runs.append(jax.device_get((state, metrics)))
  (one, m1), (eight, m8) = runs
  assert n == 32
  rounding.assert_logged_agree([m8], [m1])
  rounding.assert_agree_to_rounding(eight, one, f'{kind} state')


@pytest.mark.parametrize('kind', ['npy13', 'gray_png_1'])
def test_streamed_canvases_of_each_channel_count_agree_on_one_and_eight_devices(tmp_path, kind):
  """Two steps on C-channel canvases from the streaming loader (crops on the device): 1 device
  and 8 agree to float64 rounding."""
  from moco_jax.data import canvas_loader  # pylint: disable=g-import-not-at-top
  from tests import test_device_crops  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.data.path = own_images.make(kind, tmp_path / kind, count=16)
  config.data.cache_dir = str(tmp_path / 'cache')
  config.data.image_size = 16
  config.batch_size = 8
  config.moco.queue_size = 16
  own_images.apply(kind, config)
  normalisation.resolve(config)
  source = sources.from_config(config).open('train')
  it = canvas_loader.train_batches(source, global_batch=8, seed=3, canvas_side=32, num_threads=2,
                                   channels=config.data.channels)
  batches = [next(it) for _ in range(2)]
  assert batches[0]['image'].shape[-1] == config.data.channels
  with rounding.precise(config):
    one = test_device_crops._canvas_run(config, jax.devices()[:1], batches)
    eight = test_device_crops._canvas_run(config, jax.devices(), batches)
  rounding.assert_logged_agree(eight[1], one[1])
  rounding.assert_agree_to_rounding(eight[0], one[0], f'{kind} streamed canvases')
  assert int(one[0].step) == 2


@pytest.mark.parametrize('kind', own_images.KINDS)
def test_each_kind_trains_streamed(tmp_path, kind, caplog):
  """Every kind through the streamed path (crops on the device): 2 steps, a finite loss."""
  from moco_jax import pretrain  # pylint: disable=g-import-not-at-top
  config = helpers.tiny_config(num_train_steps=2, checkpoint_every_steps=2, log_every_steps=1,
                               batch_size=8, moco__queue_size=16, data__image_size=16,
                               data__max_in_memory_gb=0.0, data__stream_processes=0,
                               data__num_workers=2, data__cache_dir=str(tmp_path / 'cache'),
                               data__path=own_images.make(kind, tmp_path / kind, count=16))
  own_images.apply(kind, config)
  with caplog.at_level('INFO'):
    pretrain.train_and_evaluate(config, str(tmp_path / 'run'))
  assert 'streaming it' in caplog.text
  rows = helpers.read_jsonl(tmp_path / 'run' / 'metrics.jsonl')
  losses = [r['train_loss'] for r in rows if 'train_loss' in r]
  assert len(losses) == 2 and np.isfinite(losses).all(), rows


def _command(workdir, data_path, cache, *extra):
  return [sys.executable, 'main.py', '--config=configs/tiny.py', f'--workdir={workdir}',
          f'--config.data.path={data_path}', f'--config.data.cache_dir={cache}',
          '--config.data.image_size=16', '--config.batch_size=8', '--config.eval.batch_size=8',
          '--config.moco.queue_size=24', f'--config.num_train_steps={STEPS}',
          '--config.checkpoint_every_steps=2', '--config.log_every_steps=1',
          '--config.data.num_workers=2', '--config.data.stream_processes=0', *extra]


def _restore(workdir, steps=STEPS, channels=3):
  config = tiny.get_config()
  config.data.channels = channels
  config.moco.queue_size = 24
  config.batch_size = 8
  config.num_train_steps = steps
  return helpers.restore_checkpoint(workdir, config, steps, devices=jax.devices()[:2])


def _main(*args):
  return subprocess.run([sys.executable, 'main.py', *args], cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=600)


# The kinds that are also SIGKILLed and rerun through main.py, and those of them streamed.
STREAMED = ('csv_labels', 'flat', 'npy13')
RESUMED = ('nested', 'csv_labels', 'csv_no_labels', 'flat', 'gray_png', 'tiff16_4', 'npy13')


@pytest.mark.parametrize('kind', own_images.KINDS)
def test_each_kind_trains_resumes_reports_and_embeds_through_main(tmp_path, kind):
  """One run per kind through main.py; a SIGKILLed and rerun copy ends bit for bit where an
  uninterrupted run does (the kinds in RESUMED; streamed for those in STREAMED); report and embed
  read the run, kNN refuses unlabeled data naming --mode=embed, and (flat) both export formats
  hold the same arrays."""
  data_path = own_images.make(kind, tmp_path / kind, count=20)
  workdir = tmp_path / 'run'
  held = ['--config.data.val_fraction=0.25'] if kind == 'flat' else []
  command = lambda w, *more: _command(w, data_path, tmp_path / 'cache', *held,
                                      *own_images.flags(kind), *more)
  trained = subprocess.run(command(workdir), cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=600)
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert 'streaming it' not in trained.stderr
  if kind in RESUMED:
    # In memory, this run is the uninterrupted one; streamed, the pair has its own.
    streamed = ['--config.data.max_in_memory_gb=0'] if kind in STREAMED else []
    straight = workdir
    if streamed:
      straight = tmp_path / 'straight'
      done = subprocess.run(command(straight, *streamed), cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=600)
      assert done.returncode == 0, done.stderr[-3000:]
      assert 'streaming it' in done.stderr
    killed = tmp_path / 'killed'
    finished = helpers.sigkill_after_checkpoint(command(killed, *streamed), killed, ENV, STEPS,
                                                checkpoint=2)
    rerun = subprocess.run(command(killed, *streamed), cwd=ROOT, env=ENV, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    channels = own_images.OVERRIDES.get(kind, {}).get('data.channels', 3)
    helpers.assert_same_state(_restore(straight, channels=channels),
                              _restore(killed, channels=channels))
    assert not finished, 'the kill came too late to test anything'
  for mode in ('report', 'embed'):
    done = _main(f'--workdir={workdir}', f'--mode={mode}')
    assert done.returncode == 0 and 'Traceback' not in done.stderr, done.stderr[-3000:]
  page = (workdir / 'report' / 'index.html').read_text()
  labelled = kind == 'csv_labels'
  assert ('none (unlabeled)' in page) != labelled
  assert (workdir / 'report' / 'neighbours.png').exists()
  assert (workdir / 'report' / 'confusion.png').exists() == labelled
  rows = np.load(workdir / 'embeddings' / 'train.npy', mmap_mode='r')
  with open(workdir / 'embeddings' / 'train.index.csv') as f:
    index = list(csv.DictReader(f))
  assert rows.shape[0] == len(index) == (15 if kind == 'flat' else 20)
  assert ('label' in index[0]) == labelled
  # Rows follow the index: the in-memory features of the index's images, in its order.
  config = tiny.get_config()
  config.data.path, config.data.image_size = data_path, 16
  config.data.cache_dir, config.eval.batch_size = str(tmp_path / 'cache'), 8
  if held:
    config.data.val_fraction = 0.25
  config.moco.queue_size, config.batch_size = 24, 8
  own_images.apply(kind, config)
  saved = json.load(open(workdir / 'config.json'))
  if kind in own_images.OVERRIDES:  # 'auto' was computed once and recorded.
    assert len(saved['aug']['mean']) == config.data.channels == len(saved['aug']['std'])
    with config.ignore_type():
      config.aug.mean, config.aug.std = tuple(saved['aug']['mean']), tuple(saved['aug']['std'])
  backbone, variables, step, _ = frozen.load_backbone(config, str(workdir))
  assert step == STEPS
  ds = sources.from_config(config).load('train')
  # On the run's 2 devices (ENV), batches of the same size: the same program as --mode=embed's,
  # so the same float32 features, each rounded once to the file's float16.
  want = features.extract_features(config, backbone, variables, ds,
                                   parallel.make_mesh(jax.devices()[:2]), normalize=False)
  np.testing.assert_array_equal(np.asarray(rows), want.astype(np.float16))
  if not labelled:  # kNN refuses, naming --mode=embed, and writes nothing (main.py prints such
    before = sorted(os.listdir(workdir))  # an error in one line: test_robust_inputs).
    with pytest.raises(errors.DataError, match='--mode=embed'):
      knn.run_knn(config, str(workdir))
    assert sorted(os.listdir(workdir)) == before
  if kind == 'flat':
    _assert_both_exports_hold_the_same_arrays(workdir)


def _assert_both_exports_hold_the_same_arrays(workdir):
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  for fmt in ('torchvision', 'safetensors'):
    done = _main(f'--workdir={workdir}', '--mode=export', f'--config.export.format={fmt}')
    assert done.returncode == 0, done.stderr[-3000:]
  npz = dict(np.load(workdir / 'backbone_torchvision.npz'))
  tensors = safetensors_numpy.load_file(str(workdir / 'backbone.safetensors'))
  assert sorted(tensors) == sorted(npz)
  for key in npz:
    np.testing.assert_array_equal(tensors[key], npz[key])
  sidecar = json.load(open(workdir / 'backbone.json'))
  assert sidecar['in_channels'] == 3 and len(sidecar['mean']) == 3
