"""The whole path on real images: an ImageFolder archive of CIFAR-10 JPEGs -> train -> kNN."""

import io
import json
import pathlib
import tarfile

import pytest

from configs import tiny
from moco_jax import pretrain

ARCHIVE = pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'CIFAR-10-images.tar.gz'
PER_CLASS = {'train': 24, 'test': 8}
CLASSES = ('cat', 'ship')


def _small_archive(path: pathlib.Path):
  """A .tar.gz with CIFAR-10-images/{train,test}/{cat,ship}/ holding the first real JPEGs."""
  if not ARCHIVE.exists():
    pytest.skip(f'{ARCHIVE} is not available')
  counts = {(s, c): 0 for s in PER_CLASS for c in CLASSES}
  with tarfile.open(ARCHIVE, 'r|*') as src, tarfile.open(path, 'w:gz') as dst:
    for member in src:
      parts = member.name.split('/')
      key = tuple(parts[1:3])
      if member.isfile() and len(parts) == 4 and counts.get(key, 99) < PER_CLASS[key[0]]:
        counts[key] += 1
        data = src.extractfile(member).read()
        info = tarfile.TarInfo(member.name)
        info.size = len(data)
        dst.addfile(info, io.BytesIO(data))
      if all(counts[k] == PER_CLASS[k[0]] for k in counts):
        break


@pytest.mark.slow
def test_training_on_a_real_archive_writes_metrics_and_knn(tmp_path):
  archive = tmp_path / 'cifar_small.tar.gz'
  _small_archive(archive)
  config = tiny.get_config()
  config.data.path = str(archive)
  config.data.source = 'folder'
  config.data.eval_split = 'test'
  config.data.cache_dir = str(tmp_path / 'cache')
  config.batch_size = 16
  config.moco.queue_size = 40
  config.num_epochs = 2  # 48 train images: 3 steps per epoch.
  config.eval.knn_every_epochs = 0  # Only at the end.
  config.eval.knn_k = 5
  config.eval.batch_size = 16
  workdir = tmp_path / 'run'
  state = pretrain.train_and_evaluate(config, str(workdir))
  assert int(state.step) == 6
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  knn_rows = [r for r in rows if 'knn_top1' in r]
  assert len(knn_rows) == 1 and knn_rows[0]['step'] == 6
  assert 0.0 <= knn_rows[0]['knn_top1'] <= 100.0
  assert rows[-1]['epoch'] == pytest.approx(2.0)
  # The decoded images were cached where the config said.
  assert any((tmp_path / 'cache').iterdir())
