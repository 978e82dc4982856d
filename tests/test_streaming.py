"""Tests of the streaming input path (moco_jax/data/streaming.py) on generated JPEG trees."""

import io
import logging
import os
import pathlib
import subprocess
import sys
from unittest import mock

import numpy as np
from PIL import Image
import pytest

import helpers
from moco_jax.data import batching
from moco_jax.data import folder
from moco_jax.data import folder_reader
from moco_jax.data import host_crops
from moco_jax.data import sources
from moco_jax.data import spec
from moco_jax.data import streaming
from moco_jax.data import tfds_source

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCALE, RATIO = (0.2, 1.0), (3 / 4, 4 / 3)


_photo = helpers.photo


def make_tree(root: pathlib.Path, classes=3, per_class=6):
  return helpers.image_tree(root, {'train': per_class}, classes=classes)


def _config(path, tmp_path, **overrides):
  return helpers.data_config(path, **dict(dict(image_size=16, cache_dir=str(tmp_path / 'cache'),
                                               max_in_memory_gb=0.0), **overrides))


def _source(data):
  return sources.open_source(spec.from_config(data))


def _take(source, steps, **kwargs):
  kwargs = dict(dict(global_batch=4, seed=3, image_size=16, num_threads=2), **kwargs)
  it = host_crops.train_batches(source, **kwargs)
  return [next(it) for _ in range(steps)]


def test_crop_box_is_the_twin_of_the_device_sampler():
  jax = pytest.importorskip('jax')
  from moco_jax.augmentation import image_ops  # pylint: disable=g-import-not-at-top
  assert host_crops.CROP_UNIFORMS == image_ops.CROP_UNIFORMS
  rng = np.random.default_rng(0)
  u = rng.random((300, host_crops.CROP_UNIFORMS), dtype=np.float32)
  u[:100, :host_crops.CROP_TRIES] = 0.99  # Most draws too large: the fallback and late tries.
  for height, width in ((375, 500), (500, 333), (20, 200), (3, 7)):
    device = jax.jit(jax.vmap(lambda x, h=height, w=width: image_ops.crop_box_from_uniforms(
        x, h, w, SCALE, RATIO)))(u)
    host = np.stack([host_crops.crop_box(x, height, width, SCALE, RATIO) for x in u])
    np.testing.assert_array_equal(host, np.asarray(device).astype(np.int64))


def test_two_crops_cut_the_whole_image_with_draft_decoding():
  rng = np.random.default_rng(1)
  src = _photo(rng, 640, 480)
  buf = io.BytesIO()
  src.save(buf, format='JPEG', quality=95)
  data = buf.getvalue()
  u = host_crops.crop_uniforms(0, 0, 0)
  u[:, :host_crops.CROP_TRIES] = [[0.1], [0.99]]  # Small area (view 0), whole-ish image (view 1).
  crops = host_crops.two_crops(data, u, 32, SCALE, RATIO)
  assert crops.shape == (2, 32, 32, 3) and crops.dtype == np.uint8
  full = Image.open(io.BytesIO(data)).convert('RGB')
  for view in range(2):
    top, left, h, w = host_crops.crop_box(u[view], 480, 640, SCALE, RATIO)
    want = np.asarray(full.crop((left, top, left + w, top + h)).resize((32, 32), Image.BILINEAR))
    # Both boxes are >= 8x the output: decoded at 1/4 scale (draft), close to a full decode.
    assert min(h, w) >= 8 * 32
    assert np.abs(crops[view].astype(int) - want).mean() < 2
  jpeg = Image.open(io.BytesIO(data)).__class__
  with mock.patch.object(jpeg, 'draft', autospec=True, wraps=jpeg.draft) as draft:
    host_crops.two_crops(data, u, 32, SCALE, RATIO)
  assert draft.call_args.args[2] == (640 * 64 // 276, 480 * 64 // 276)
  # A decoded array (mocked tfds) and a grayscale PNG take the same route; junk gives None.
  gray = io.BytesIO()
  src.convert('L').save(gray, format='PNG')
  assert host_crops.two_crops(gray.getvalue(), u, 8, SCALE, RATIO).shape == (2, 8, 8, 3)
  assert host_crops.two_crops(np.asarray(src), u, 8, SCALE, RATIO).shape == (2, 8, 8, 3)
  assert host_crops.two_crops(b'\xff\xd8\xff junk', u, 8, SCALE, RATIO) is None


def test_order_resume_and_per_process_shards(tmp_path):
  source = _source(_config(make_tree(tmp_path / 'tree'), tmp_path)).open('train')
  assert len(source) == 18 and source.class_names == ['class0000', 'class0001', 'class0002']
  full = _take(source, 6)
  for step, batch in enumerate(full):
    assert batch['image'].shape == (4, 2, 16, 16, 3) and batch['image'].dtype == np.uint8
    # The in-memory path's order: examples of step s = train_indices(N, B, seed, s).
    np.testing.assert_array_equal(batch['index'], batching.train_indices(18, 4, 3, step))
    np.testing.assert_array_equal(batch['label'], batch['index'] // 6)
  resumed = _take(source, 2, start_step=4)
  for a, b in zip(full[4:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
  # Two processes: each reads only its half of every global batch, and the
  # halves (crops included) are the one-process batch.
  original = folder_reader.FolderReader.read
  for step in range(3):
    halves = []
    for p in range(2):
      read, own = [], _source(_config(tmp_path / 'tree', tmp_path)).open('train')

      def spy(self, i, own=own, read=read):
        if self is own:  # Not the reads of the iterators above, still prefetching.
          read.append(i)
        return original(self, i)

      with mock.patch.object(folder_reader.FolderReader, 'read', autospec=True, side_effect=spy):
        halves.append(_take(own, 1, start_step=step, process_index=p, process_count=2,
                            prefetch=0, num_threads=1, end_step=step + 1)[0])
      assert sorted(read) == sorted(batching.train_indices(18, 4, 3, step)[2 * p:2 * p + 2])
    np.testing.assert_array_equal(np.concatenate([h['image'] for h in halves]),
                                  full[step]['image'])


def test_unreadable_files_are_replaced_deterministically_and_counted(tmp_path):
  root = make_tree(tmp_path / 'tree', classes=2, per_class=4)
  (root / 'train' / 'class0000' / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff' + b'x' * 50)
  (root / 'train' / 'class0001' / 'notes.txt').write_text('not an image')
  source = _source(_config(root, tmp_path)).open('train')
  assert len(source) == 10
  batches = _take(source, 5, global_batch=5, seed=0)
  skipped = sum(int(b['skipped'].sum()) for b in batches)
  # Every example appears once per epoch (2 steps of 5): the 2 bad ones, once each.
  assert 4 <= skipped <= 6  # Once per epoch each: 2 full epochs + half of a third.
  bad = {source.name(i) for i in range(10)} & {'train/class0000/corrupt.jpg',
                                               'train/class0001/notes.txt'}
  assert len(bad) == 2
  for batch in batches:
    assert all(source.name(int(i)) not in bad for i in batch['index'])
  again = _take(source, 5, global_batch=5, seed=0)
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['index'], b['index'])


def test_plan_logs_its_choice_and_the_index_is_cached(tmp_path, caplog):
  root = make_tree(tmp_path / 'tree')
  with caplog.at_level(logging.INFO):
    plan = streaming.plan(_source(_config(root, tmp_path, max_in_memory_gb=1.0)))
  assert not plan.stream and 'decoding it into memory' in plan.reason
  assert any('Input: the train split (18 images' in r.getMessage() for r in caplog.records)
  plan = streaming.plan(_source(_config(root, tmp_path, max_in_memory_gb=1e-6)))
  assert plan.stream and 'streaming it' in plan.reason and len(plan.reader) == 18
  # -1: a quarter of the host's RAM.
  budget, text = spec.memory_budget(_config(root, tmp_path, max_in_memory_gb=-1))
  assert budget == spec.host_memory_bytes() // 4 and '25%' in text
  # A warm run lists nothing; a new file in a class changes the key.
  with mock.patch.object(folder, 'Tree', side_effect=AssertionError('listed again')):
    assert len(_source(_config(root, tmp_path)).open('train')) == 18
  _photo(np.random.default_rng(0), 20, 20).save(root / 'train' / 'class0001' / 'new.jpg')
  assert len(_source(_config(root, tmp_path)).open('train')) == 19


def test_bad_layouts_get_the_in_memory_errors(tmp_path):
  root = make_tree(tmp_path / 'tree')
  (root / 'train' / 'zebra').mkdir()
  with pytest.raises(ValueError, match=r'class folder train/zebra/ has no image files'):
    _source(_config(root, tmp_path)).open('train')
  with pytest.raises(ValueError, match=r"no 'nope' folder"):
    _source(_config(root, tmp_path, train_split='nope')).open('train')
  # An archive too large for the budget is refused with what to do instead.
  (root / 'train' / 'zebra').rmdir()
  archive = tmp_path / 'tree.tar'
  subprocess.run(['tar', 'cf', str(archive), '-C', str(root), 'train'], check=True)
  with pytest.raises(ValueError, match='large sets must be directories.*tar xf'):
    streaming.plan(_source(_config(archive, tmp_path, max_in_memory_gb=1e-6)))
  assert not streaming.plan(_source(_config(archive, tmp_path, max_in_memory_gb=1))).stream


def test_tfds_imagenet2012_streams_through_its_data_source(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  config = _config('', tmp_path, source='tfds', name='imagenet2012')
  with tfds.testing.mock_data(num_examples=12), \
      mock.patch.object(tfds.core.DatasetBuilder, 'is_prepared', return_value=True), \
      mock.patch.object(tfds_source, 'split_counts', return_value={'train': 12}):
    plan = streaming.plan(_source(config))
    assert plan.stream and 'tfds imagenet2012' in plan.reason
    assert len(plan.reader) == 12 and len(plan.reader.class_names) == 1000
    batches = _take(plan.reader, 4, global_batch=4)
  labels = [plan.reader.label(int(i)) for i in batches[0]['index']]
  np.testing.assert_array_equal(batches[0]['label'], labels)
  assert batches[0]['image'].shape == (4, 2, 16, 16, 3)


@pytest.mark.slow
def test_streaming_a_folder_needs_no_tensorflow(tmp_path):
  """With TensorFlow unimportable, a folder streams through grain worker processes,
  and their shared memory is released by the end."""
  root = make_tree(tmp_path / 'tree')
  script = tmp_path / 'no_tf.py'
  script.write_text(f"""
import sys
sys.modules['tensorflow'] = None  # Any import of TensorFlow now fails.
from configs import default
from moco_jax.data import host_crops
from moco_jax.data import sources
from moco_jax.data import spec
from moco_jax.data import streaming

def main():
  config = default.get_config().data
  config.update(dict(path={str(root)!r}, cache_dir={str(tmp_path / 'c')!r}, image_size=8,
                     max_in_memory_gb=0.0))
  plan = streaming.plan(sources.open_source(spec.from_config(config)))
  it = host_crops.train_batches(plan.reader, global_batch=4, seed=0, image_size=8,
                               num_threads=1, num_processes=1)
  held = [next(it) for _ in range(3)]  # Alive at exit, as a train loop's last batch is.
  assert held[0]['image'].shape == (4, 2, 8, 8, 3)
  it.close()
  assert not [m for m, v in sys.modules.items() if m.startswith('tensorflow') and v is not None]
  print('ok')

if __name__ == '__main__':  # Grain's worker processes are spawned: they import this file.
  main()
""")
  out = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert out.returncode == 0 and out.stdout.strip().endswith('ok'), out.stderr[-3000:]
  # Every worker batch's shared memory is released: no resource_tracker warning at exit.
  assert 'leaked shared_memory' not in out.stderr, out.stderr[-3000:]
