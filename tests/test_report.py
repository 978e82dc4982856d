"""--mode=report on a tiny real run: 10 CIFAR-10 classes, a few steps, every picture checked."""

import copy
import io
import pathlib
import shutil
import tarfile

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
from PIL import Image
import pytest

from configs import tiny
from moco_jax.core import parallel
from moco_jax.data import batching
from moco_jax.data import sources
from moco_jax.evaluation import report
from moco_jax.evaluation import report_plots
from moco_jax import pretrain
from moco_jax.training import state as state_lib
from moco_jax.training import step as step_lib

ARCHIVE = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'CIFAR-10-images.tar.gz'
PER_CLASS = {'train': 8, 'test': 4}


def _ten_class_archive(path: pathlib.Path):
  """CIFAR-10-images/{train,test}/<class>/ with the first real JPEGs of all 10 classes."""
  if not ARCHIVE.exists():
    pytest.skip(f'{ARCHIVE} is not available')
  counts = {}
  with tarfile.open(ARCHIVE, 'r|*') as src, tarfile.open(path, 'w:gz') as dst:
    for member in src:
      parts = member.name.split('/')
      if not (member.isfile() and len(parts) == 4 and parts[1] in PER_CLASS):
        continue
      key = tuple(parts[1:3])
      if counts.get(key, 0) < PER_CLASS[key[0]]:
        counts[key] = counts.get(key, 0) + 1
        data = src.extractfile(member).read()
        info = tarfile.TarInfo(member.name)
        info.size = len(data)
        dst.addfile(info, io.BytesIO(data))
  assert len(counts) == 20, counts


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(config, workdir, final state) of 6 steps on 80 real train images of 10 classes."""
  tmp = tmp_path_factory.mktemp('report')
  archive = tmp / 'cifar10_small.tar.gz'
  _ten_class_archive(archive)
  config = tiny.get_config()
  config.data.path = str(archive)
  config.data.eval_split = 'test'
  config.data.cache_dir = str(tmp / 'cache')
  # The train step of tests/test_real_data.py (batch 16, K 40, 6 steps): the persistent compilation
  # cache then serves it; 80 train images make 5 steps an epoch, so step 6 is in epoch 2.
  config.batch_size = 16
  config.moco.queue_size = 40
  config.num_train_steps = 6
  config.log_every_steps = 1
  config.eval.knn_every_epochs = 0
  config.eval.knn_k = 5
  config.eval.batch_size = 16
  config.report.augment_step = 3
  workdir = tmp / 'run'
  state = pretrain.train_and_evaluate(config, str(workdir))
  return config, workdir, state


def _check_png(path: pathlib.Path, size: tuple):
  with Image.open(path) as image:
    assert image.size == size, path.name
    pixels = np.asarray(image.convert('RGB'), np.float32)
  assert pixels.std() > 10, f'{path.name} looks blank'
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, f'{path.name} looks blank'


def test_report_draws_every_picture_of_a_real_run(run):
  config, workdir, _ = run
  page = pathlib.Path(report.run_report(config, str(workdir)))
  out = workdir / 'report'
  assert page == out / 'index.html'
  expected = {
      'curves.png': report_plots.CURVES_SIZE,
      'tsne.png': report_plots.TSNE_SIZE,
      'confusion.png': report_plots.CONFUSION_SIZE,
      'neighbours.png': report_plots.grid_size(report.NUM_QUERIES, report.NUM_NEIGHBOURS + 1,
                                               row_labels=False, gap=True),
      'augmentations.png': report_plots.grid_size(3, report.NUM_AUGMENTED, row_labels=True,
                                                  gap=False),
  }
  assert set(expected) == set(report.PICTURES)
  for name, size in expected.items():
    _check_png(out / name, size)
  text = page.read_text()
  for name in report.PICTURES:
    assert f'src="{name}"' in text
  assert 'checkpoint step' in text and 'Not drawn' not in text


def test_augmentation_preview_redraws_the_train_steps_views(run):
  config, _, state = run
  # The report derives the run's rng from the seed: it is the state's.
  np.testing.assert_array_equal(jax.device_get(state_lib.run_rng(config.seed)),
                                jax.device_get(state.rng))
  train_ds = sources.from_config(config).load('train')
  images, _, query, key = report.augmentation_preview(config, train_ds, step=3, count=4)
  assert images.shape == query.shape == key.shape == (4, 32, 32, 3)
  assert query.dtype == np.uint8 and not np.array_equal(query, key)
  # The views of the train step's own function on the whole batch of step 3, on 8 devices.
  batch = train_ds.images[batching.train_indices(len(train_ds), config.batch_size,
                                                       config.seed, 3)]
  np.testing.assert_array_equal(images, batch[:4])
  setup = step_lib.make_step_setup(config, jax.device_count(), tx=None)
  views = jax.jit(jax.shard_map(lambda s, im: step_lib.augment_views(s, im, setup)[:2],
                                mesh=parallel.make_mesh(), in_specs=(P(), P('data')),
                                out_specs=(P('data'), P('data')), check_vma=False))
  query_train, key_train = views(state.replace(step=jnp.int32(3)), batch)
  to_uint8 = report._to_uint8  # pylint: disable=protected-access
  np.testing.assert_array_equal(query, to_uint8(query_train[:4], config.aug))
  np.testing.assert_array_equal(key, to_uint8(key_train[:4], config.aug))


def test_report_of_a_run_without_checkpoint(run, tmp_path):
  config, workdir, _ = run
  early = tmp_path / 'early'
  early.mkdir()
  shutil.copy(workdir / 'metrics.jsonl', early / 'metrics.jsonl')
  text = pathlib.Path(report.run_report(config, str(early))).read_text()
  for name in ('curves.png', 'tsne.png', 'augmentations.png'):
    assert f'src="{name}"' in text
    assert (early / 'report' / name).exists()
  assert 'Not drawn' in text and 'neighbours.png' in text


def test_a_streamed_run_gets_its_report_on_a_subset(run, tmp_path, caplog):
  """A split too large for data.max_in_memory_gb is drawn from a fixed subset, not refused."""
  config, workdir, _ = run
  with tarfile.open(config.data.path) as archive:
    archive.extractall(tmp_path, filter='data')
  streamed = copy.deepcopy(config)
  streamed.data.path = str(tmp_path / 'CIFAR-10-images')
  streamed.data.max_in_memory_gb = 1e-6  # 80 images at 32 px are 0.0002 GiB: streamed.
  copy_dir = tmp_path / 'workdir'
  shutil.copytree(workdir, copy_dir)
  with caplog.at_level('INFO'):
    page = report.run_report(streamed, str(copy_dir))
  messages = [r.getMessage() for r in caplog.records]
  assert any(m.startswith('Report: the train split is streamed') and
             'subset of 80 of its 80 images' in m for m in messages), messages
  text = open(page).read()
  assert 'neighbours.png' in text and 'Not drawn' not in text
