"""Tests of the host input pipeline on small trees of real CIFAR-10 images.

Trees and archives are built in tmp_path from a handful of real JPEGs (plus a
corrupt file, a text file, an RGBA PNG, a grayscale, a CMYK, a tiny and a
non-square image), so every source path runs in seconds without the network.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import io  # pylint: disable=g-import-not-at-top
import logging
import pathlib
import re
import socket
import tarfile
import time
from unittest import mock

import numpy as np
from PIL import Image
import pytest

from moco_jax.core import errors
import helpers
from moco_jax.data import batching
from moco_jax.data import dataset
from moco_jax.data import decode
from moco_jax.data import sources
from moco_jax.data import spec
from moco_jax.data import tfds_source

DATA = pathlib.Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
CLASSES = ('airplane', 'automobile', 'bird')


@pytest.fixture(scope='module')
def jpegs():
  """{class: [jpeg bytes]}: the first 5 real CIFAR-10 test JPEGs of 3 classes."""
  archive = DATA / 'CIFAR-10-images.tar.gz'
  if not archive.exists():
    pytest.skip(f'{archive} is not available')
  found = {c: [] for c in CLASSES}
  with tarfile.open(archive, 'r|*') as tar:
    for member in tar:
      parts = member.name.split('/')
      if member.isfile() and len(parts) == 4 and parts[1] == 'test' and parts[2] in found:
        if len(found[parts[2]]) < 5:
          found[parts[2]].append(tar.extractfile(member).read())
        if all(len(v) == 5 for v in found.values()):
          break
  return found


def _source(data):
  """The source of a data section (what `sources.from_config` opens for a whole config)."""
  return sources.open_source(spec.from_config(data))


def _rgb(data: bytes) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))


def _encode(image: Image.Image, fmt: str) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format=fmt)
  return buf.getvalue()


def _make_tree(root: pathlib.Path, jpegs, eval_dir='val') -> dict:
  """Writes ROOT/{train,<eval_dir>}/<class>/* and returns {relative name: expected uint8 32x32}.

  bird/ also gets the odd files; None marks files that must be skipped.
  """
  expected = {}
  for c in CLASSES:
    for split, items in (('train', jpegs[c][:3]), (eval_dir, jpegs[c][3:])):
      (root / split / c).mkdir(parents=True, exist_ok=True)
      for i, data in enumerate(items):
        (root / split / c / f'{i}.jpg').write_bytes(data)
        expected[f'{split}/{c}/{i}.jpg'] = _rgb(data)
  bird = root / 'train' / 'bird'
  src = Image.fromarray(_rgb(jpegs['bird'][0]))
  rgba = src.convert('RGBA')
  rgba.putalpha(128)
  extras = {
      'rgba.png': (_encode(rgba, 'PNG'), np.asarray(src)),
      'gray.png': (_encode(src.convert('L'), 'PNG'),
                   np.repeat(np.asarray(src.convert('L'))[..., None], 3, -1)),
      'cmyk.jpg': (_encode(src.convert('CMYK'), 'JPEG'), None),
      'tiny.png': (_encode(src.crop((0, 0, 8, 8)), 'PNG'),
                   np.asarray(src.crop((0, 0, 8, 8)).resize((32, 32), Image.BILINEAR))),
      # 48x32: the shorter side is already 32, so the centre 32x32 is kept as is.
      'wide.png': (_encode(Image.fromarray(np.tile(np.asarray(src), (1, 2, 1))[:, 8:56]), 'PNG'),
                   np.tile(np.asarray(src), (1, 2, 1))[:, 16:48]),
      'corrupt.jpg': (jpegs['bird'][1][:200], None),
      'notes.txt': (b'not an image', None),
  }
  for name, (data, want) in extras.items():
    (bird / name).write_bytes(data)
    expected[f'train/bird/{name}'] = want if name not in ('corrupt.jpg', 'notes.txt') else 'skip'
  return expected


_config = helpers.data_config


def _tar(src: pathlib.Path, out: pathlib.Path, top: str = '', mode='w:gz') -> pathlib.Path:
  with tarfile.open(out, mode) as tar:
    for child in sorted(src.iterdir()):
      tar.add(child, arcname=f'{top}{child.name}' if top else child.name)
  return out


@pytest.fixture
def tree(tmp_path, jpegs):
  root = tmp_path / 'mini'
  return root, _make_tree(root, jpegs)


# --------------------------------------------------------------------------
# Folder source.


def test_folder_tree_decodes_converts_and_skips_bad_files(tree, tmp_path, caplog):
  root, expected = tree
  config = _config(root, cache_dir=str(tmp_path / 'cache'))
  with caplog.at_level(logging.WARNING):
    ds = _source(config).load('train')
  train = sorted(n for n in expected if n.startswith('train/') and not isinstance(expected[n], str))
  assert len(ds) == len(train) == 9 + 5
  assert ds.images.dtype == np.uint8 and ds.images.shape == (14, 32, 32, 3)
  assert ds.labels.dtype == np.int32 and ds.class_names == list(CLASSES) and ds.num_classes == 3
  np.testing.assert_array_equal(np.bincount(ds.labels), [3, 3, 8])
  # Dataset order: sorted classes, then sorted file names within a class.
  for i, name in enumerate(train):
    want = expected[name]
    if want is None:  # CMYK: only checks that it decoded to RGB.
      continue
    np.testing.assert_allclose(ds.images[i], want, atol=1 if 'tiny' in name else 0)
  gray = train.index('train/bird/gray.png')
  assert (ds.images[gray, ..., 0] == ds.images[gray, ..., 2]).all()
  warnings = [r for r in caplog.records if 'Skipped 2 of 16 files' in r.getMessage()]
  assert len(warnings) == 1, [r.getMessage() for r in caplog.records]


def test_archives_read_as_is_equal_the_folder(tree, tmp_path):
  root, _ = tree
  folder = _source(_config(root, cache_dir=str(tmp_path / 'c0'))).load('eval')
  tgz = _tar(root, tmp_path / 'mini.tgz', top='mini/')  # One top-level dir, like imagenette2.
  tar = _tar(root, tmp_path / 'flat.tar', mode='w')  # train/ at the top.
  for archive in (tgz, tar):
    for split in ('train', 'eval'):
      got = _source(_config(archive, cache_dir=str(tmp_path / 'c1'))).load(split)
      want = _source(_config(root, cache_dir=str(tmp_path / 'c0'))).load(split)
      np.testing.assert_array_equal(got.images, want.images)
      np.testing.assert_array_equal(got.labels, want.labels)
      assert got.class_names == want.class_names
  assert len(folder) == 6


def test_second_load_hits_the_cache_and_changes_invalidate_it(tree, tmp_path):
  root, _ = tree
  tgz = _tar(root, tmp_path / 'mini.tar.gz', top='mini/')
  for path in (root, tgz):
    config = _config(path, cache_dir=str(tmp_path / 'cache'))
    first = _source(config).load('train')
    with mock.patch.object(decode, 'decode_image', side_effect=AssertionError('decoded')):
      second = _source(config).load('train')
    np.testing.assert_array_equal(first.images, second.images)
    assert first.class_names == second.class_names
  assert len(list((tmp_path / 'cache').glob('*.images.npy'))) == 2
  # A changed file changes the key: decoding runs again.
  airplane = root / 'train' / 'airplane'
  (airplane / '0.jpg').write_bytes((airplane / '1.jpg').read_bytes())
  with mock.patch.object(decode, 'decode_image', wraps=decode.decode_image) as spy:
    _source(_config(root, cache_dir=str(tmp_path / 'cache'))).load('train')
  assert spy.call_count == 16


def test_missing_eval_split_falls_back_to_test(tmp_path, jpegs, caplog):
  root = tmp_path / 'cifar'
  _make_tree(root, jpegs, eval_dir='test')
  with caplog.at_level(logging.INFO):
    ds = _source(_config(root, cache_dir=str(tmp_path / 'c'))).load('eval')
  assert len(ds) == 6 and ds.class_names == list(CLASSES)
  assert any("using split 'test'" in r.getMessage() for r in caplog.records)
  with pytest.raises(ValueError, match=r'data\.eval_split=.nope. is not in'):
    dataset.pick_split('nope', ['train'], 'eval_split', 'here', allow_fallback=True)
  with pytest.raises(ValueError, match=r'data\.train_split'):
    _source(_config(root, train_split='test2')).load('train')


def test_bad_paths_fail_early_naming_the_field(tmp_path, jpegs):
  with pytest.raises(FileNotFoundError, match=r'data\.path=.*does not exist'):
    _source(_config(tmp_path / 'nope.tgz')).load('train')
  not_archive = tmp_path / 'x.zip'
  not_archive.write_bytes(b'PK')
  with pytest.raises(ValueError, match=r'data\.path=.*not a \.tar'):
    _source(_config(not_archive)).load('train')
  only_val = tmp_path / 'only_val'
  (only_val / 'val' / 'a').mkdir(parents=True)
  (only_val / 'val' / 'a' / '0.jpg').write_bytes(jpegs['bird'][0])
  with pytest.raises(ValueError, match=r"no 'train' folder"):
    _source(_config(only_val)).load('train')
  with pytest.raises(ValueError, match=r"no 'train' folder"):
    _source(_config(_tar(only_val, tmp_path / 'only_val.tgz'))).load('train')
  empty = tmp_path / 'empty'
  _make_tree(empty, jpegs)
  (empty / 'train' / 'zebra').mkdir()
  with pytest.raises(ValueError, match=r'class folder train/zebra/ has no image files'):
    _source(_config(empty, cache_dir=str(tmp_path / 'c'))).load('train')
  unreadable = tmp_path / 'junk'
  (unreadable / 'train' / 'a').mkdir(parents=True)
  (unreadable / 'train' / 'a' / 'x.jpg').write_bytes(b'junk')
  with pytest.raises(ValueError, match='No readable image'):
    _source(_config(unreadable, cache_dir=str(tmp_path / 'c'))).load('train')
  config = _config()
  config.source = 'folder'
  with pytest.raises(ValueError, match='data.path'):
    _source(config).load('train')
  with pytest.raises(ValueError, match="'train' or 'eval'"):
    _source(_config(source='synthetic')).load('test')


def test_decode_resizes_shorter_side_then_centre_crops(jpegs):
  src = Image.fromarray(_rgb(jpegs['automobile'][0])).resize((64, 40), Image.BILINEAR)
  got = decode.decode_image(_encode(src, 'PNG'), 20)
  want = np.asarray(src.resize((32, 20), Image.BILINEAR))[:, 6:26]
  assert got.shape == (20, 20, 3)
  assert np.abs(got.astype(int) - want).mean() < 3  # One resample vs resample + crop.
  assert decode.decode_image(b'\xff\xd8\xff garbage', 20) is None


# --------------------------------------------------------------------------
# tfds source (TensorFlow is imported by these tests only).


def test_tfds_source_reads_a_prepared_dataset(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  config = _config(source='tfds', name='cifar10', image_size=16, cache_dir=str(tmp_path / 'c'))
  with tfds.testing.mock_data(num_examples=6), \
      mock.patch.object(tfds.core.DatasetBuilder, 'is_prepared', return_value=True), \
      mock.patch.object(tfds_source, 'split_counts', return_value={'train': 6, 'test': 6}):
    ds = _source(config).load('train')
  assert ds.images.shape == (6, 16, 16, 3) and ds.images.dtype == np.uint8
  assert ds.labels.shape == (6,) and ds.num_classes == 10


def test_tfds_not_prepared_with_download_off_fails_at_once_pointing_at_data_path(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  config = _config(source='tfds', name='imagenette/160px-v2', data_dir=str(tmp_path),
                   download=False)
  start = time.time()
  with mock.patch.object(tfds.core.DatasetBuilder, 'download_and_prepare',
                         side_effect=AssertionError('must not download')), \
      pytest.raises(FileNotFoundError, match=r'not prepared.*download=False.*--config\.data\.path'):
    _source(config).load('train')
  assert time.time() - start < 20  # tfds.load would retry downloads for minutes.


def test_tfds_offline_download_fails_at_once_pointing_at_data_path(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  import requests  # pylint: disable=g-import-not-at-top  (tfds' downloader uses it)
  config = _config(source='tfds', name='imagenette/160px-v2', data_dir=str(tmp_path))
  offline = requests.exceptions.ConnectionError(
      "HTTPSConnectionPool(host='s3.amazonaws.com', port=443): Max retries exceeded "
      '(Caused by NameResolutionError: Failed to resolve)')
  start = time.time()
  with mock.patch.object(tfds.core.DatasetBuilder, 'download_and_prepare',
                         side_effect=offline) as download, \
      mock.patch.object(tfds_source, 'offline_reason', return_value=None), \
      pytest.raises(FileNotFoundError) as info:
    _source(config).load('train')
  assert time.time() - start < 20
  assert download.call_count == 1
  message = str(info.value)
  assert '\n' not in message and str(tmp_path) in message
  assert re.search(r'not prepared.*downloading it failed \(ConnectionError.*--config\.data\.path',
                   message)


def test_tfds_download_on_a_host_without_dns_fails_in_seconds_without_trying(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  config = _config(source='tfds', name='imagenette/160px-v2', data_dir=str(tmp_path))
  start = time.time()
  with mock.patch.dict(os.environ, {v: '' for v in tfds_source._PROXY_VARIABLES}), \
      mock.patch.object(tfds_source.socket, 'getaddrinfo',
                        side_effect=socket.gaierror(-2, 'Name or service not known')), \
      mock.patch.object(tfds.core.DatasetBuilder, 'download_and_prepare',
                        side_effect=AssertionError('must not try')), \
      pytest.raises(FileNotFoundError,
                    match=r'offline \(cannot resolve .*Name or service.*--config\.data\.path'):
    _source(config).load('train')
  assert time.time() - start < 20


def test_tfds_manual_download_dataset_is_refused_without_trying(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  config = _config(source='tfds', name='imagenet2012', data_dir=str(tmp_path))
  with mock.patch.object(tfds.core.DatasetBuilder, 'download_and_prepare',
                         side_effect=AssertionError('must not try')), \
      pytest.raises(FileNotFoundError, match=r'imagenet2012.*by hand.*--config\.data\.path'):
    _source(config).load('train')


def test_tfds_unprepared_dataset_is_downloaded_and_read(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  config = _config(source='tfds', name='cifar10', image_size=16, cache_dir=str(tmp_path / 'c'),
                   data_dir=str(tmp_path / 'tfds'))
  prepared = []

  def download_and_prepare(builder, **unused_kwargs):
    prepared.append(builder.name)

  with tfds.testing.mock_data(num_examples=6), \
      mock.patch.object(tfds_source, 'split_counts', return_value={'train': 6, 'test': 6}), \
      mock.patch.object(tfds_source, 'offline_reason', return_value=None), \
      mock.patch.object(tfds.core.DatasetBuilder, 'is_prepared', lambda b: bool(prepared)), \
      mock.patch.object(tfds.core.DatasetBuilder, 'download_and_prepare', download_and_prepare):
    ds = _source(config).load('train')
    again = _source(config).load('eval')  # Prepared now: no second download.
  assert prepared == ['cifar10']
  assert ds.images.shape == (6, 16, 16, 3) and ds.labels.shape == (6,) and len(again) == 6


# --------------------------------------------------------------------------
# Batches.


def _synthetic(n=50, side=4):
  config = _config(source='synthetic', image_size=side, synthetic_examples=n)
  return _source(config).load('train')


def test_train_order_is_deterministic_and_resumable():
  ds = _synthetic()

  def take(n, **kw):
    it = batching.train_batches(ds, global_batch=8, seed=5, **kw)
    out = [next(it) for _ in range(n)]
    it.close()
    return out

  full = take(15)
  assert all(b['image'].shape == (8, 4, 4, 3) and b['label'].dtype == np.int32 for b in full)
  resumed = take(8, start_step=7)
  for a, b in zip(full[7:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
  unthreaded = take(15, prefetch=0)
  for a, b in zip(full, unthreaded):
    np.testing.assert_array_equal(a['image'], b['image'])
  # 50 // 8 = 6 steps per epoch, each epoch a fresh permutation without repeats.
  perm0 = batching.epoch_permutation(50, 5, 0)
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in full[:6]]),
                                ds.labels[perm0[:48]])
  assert not np.array_equal(full[0]['image'], full[6]['image'])
  # The on-device feed reads the same examples through train_indices.
  for step in (0, 5, 6, 13):
    idx = batching.train_indices(50, 8, 5, step)
    np.testing.assert_array_equal(ds.images[idx], full[step]['image'])
  other_seed = batching.train_batches(ds, global_batch=8, seed=6)
  assert not np.array_equal(next(other_seed)['image'], full[0]['image'])
  # Each process gets its slice of the same global batch.
  halves = [next(batching.train_batches(ds, global_batch=8, seed=5, start_step=3,
                                              process_index=p, process_count=2))
            for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([h['image'] for h in halves]), full[3]['image'])
  with pytest.raises(ValueError, match='larger than the dataset'):
    next(batching.train_batches(ds, global_batch=64, seed=0))


def test_eval_batches_cover_every_example_once_with_mask():
  ds = _synthetic(n=23)
  ds.labels = np.arange(23, dtype=np.int32)
  for count in (1, 2):
    seen = []
    for p in range(count):
      for batch in batching.eval_batches(ds, global_batch=8, process_index=p,
                                               process_count=count):
        assert batch['image'].shape == (8 // count, 4, 4, 3) and batch['mask'].dtype == bool
        seen.extend(batch['label'][batch['mask']])
    assert sorted(seen) == list(range(23))
  batches = list(batching.eval_batches(ds, global_batch=8))
  assert len(batches) == 3 and batches[-1]['mask'].sum() == 7


def test_synthetic_source_uses_cache_size():
  config = _config(source='synthetic', cache_size=40, synthetic_examples=6)
  ds = _source(config).load('eval')
  assert ds.images.shape == (6, 40, 40, 3) and len(ds.class_names) == ds.num_classes


def test_the_decode_cache_is_verified_by_content(tree, tmp_path, caplog):
  """Issue 32, item 2: a byte changed in the cached images or labels (same size, marker intact)
  is seen on read: logged, decoded again, never used."""
  root, _ = tree
  config = _config(root, cache_dir=str(tmp_path / 'cache'))
  first = _source(config).load('train')
  stem = str(next((tmp_path / 'cache').glob('*.images.npy')))[:-len('.images.npy')]
  for suffix, where in (('.images.npy', -1), ('.images.npy', 200), ('.labels.npy', -1)):
    path = stem + suffix
    good = open(path, 'rb').read()
    data = bytearray(good)
    data[where] ^= 0x01
    open(path, 'wb').write(bytes(data))
    with caplog.at_level(logging.WARNING), mock.patch.object(
        decode, 'decode_image', wraps=decode.decode_image) as spy:
      again = _source(config).load('train')
    assert spy.call_count == 16, suffix
    assert 'checksum' in caplog.text
    caplog.clear()
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.labels, first.labels)
    open(path, 'wb').write(good)


def test_an_image_over_the_pixel_limit_is_reported_as_too_large(tmp_path, caplog):
  """Issue 32, item 8: a decompression-bomb-sized image is 'too large' with the limit and the
  field that raises it (not 'corrupt'), beside a corrupt file reported as such; with every
  image too large the error says so; data.max_image_pixels raises the limit."""
  root = tmp_path / 'tree'
  for cls in ('a', 'b'):
    (root / 'train' / cls).mkdir(parents=True)
    for i in range(3):
      Image.fromarray(np.full((40, 30, 3), 40 * i, np.uint8)).save(root / 'train' / cls / f'{i}.png')
  (root / 'train' / 'a' / 'broken.png').write_bytes(b'not a png')
  config = _config(root, cache_dir=str(tmp_path / 'cache'))
  try:
    decode.set_max_image_pixels(1000)  # 40 x 30 = 1200 pixels: every image is over it.
    with pytest.raises(errors.DataError, match=r'larger than the decoder.s limit of 1000 pixels.*'
                                               r'1200 pixels.*data\.max_image_pixels'):
      _source(config).load('train')
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / 'train' / 'b' / 'small.png')
    with caplog.at_level(logging.WARNING):
      ds = _source(_config(root, cache_dir=str(tmp_path / 'c2'))).load('train')
    assert len(ds) == 1
    assert '6 of 8 files' in caplog.text and 'max_image_pixels' in caplog.text
    assert "Skipped 1 of 8 files" in caplog.text and 'broken.png' in caplog.text
    decode.set_max_image_pixels(-1)
    assert len(_source(_config(root, cache_dir=str(tmp_path / 'c3'))).load('train')) == 7
  finally:
    decode.set_max_image_pixels(decode.DEFAULT_MAX_IMAGE_PIXELS)


@pytest.mark.parametrize('crops', ['device', 'host'])
def test_the_streaming_loaders_name_an_image_over_the_pixel_limit_as_too_large(tmp_path, caplog,
                                                                              crops):
  """Issue 32, item 8, streamed: the replaced image is 'too large' with its pixels, the limit
  and the field (a corrupt file beside it stays 'not a readable image file'); the limit reaches
  the loader's copies in grain's worker processes with the loader object."""
  from moco_jax.data import canvas_loader  # pylint: disable=g-import-not-at-top
  from moco_jax.data import host_crops  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'tree'
  (root / 'train' / 'a').mkdir(parents=True)
  for i in range(6):
    Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(root / 'train' / 'a' / f'{i}.png')
  Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(root / 'train' / 'a' / 'big.png')
  (root / 'train' / 'a' / 'broken.png').write_bytes(b'not a png')
  config = _config(root, cache_dir=str(tmp_path / 'cache'))
  source = _source(config).open('train')
  try:
    decode.set_max_image_pixels(1000)  # 40 x 40 = 1600 pixels: over it; 20 x 20 is not.
    if crops == 'device':
      load = canvas_loader.LoadCanvasBatch(source, global_batch=8, seed=0, process_index=0,
                                           process_count=1, canvas_side=48)
    else:
      load = host_crops.LoadExample(source, global_batch=8, seed=0, process_index=0,
                                    process_count=1, image_size=8, crop_scale=(0.2, 1.0),
                                    crop_ratio=(3 / 4, 4 / 3))
    decode.set_max_image_pixels(decode.DEFAULT_MAX_IMAGE_PIXELS)  # As a fresh worker starts.
    with caplog.at_level(logging.WARNING):
      for i in range(1 if crops == 'device' else 8):
        load(i)
  finally:
    decode.set_max_image_pixels(decode.DEFAULT_MAX_IMAGE_PIXELS)
  said = [r.getMessage() for r in caplog.records if 'Unreadable image' in r.getMessage()]
  big = [m for m in said if 'big.png' in m.split('(')[0]]
  broken = [m for m in said if 'broken.png' in m.split('(')[0]]
  assert big and broken, said
  assert all('1600 pixels' in m and 'limit of 1000' in m and 'data.max_image_pixels' in m
             for m in big), big
  assert all('not a readable image file' in m for m in broken), broken


def test_an_unreadable_directory_is_reported_not_dropped(tree, tmp_path, monkeypatch):
  """Issue 32, item 8: a class directory that cannot be listed (permissions) is an error naming
  it, for every directory of the tree (root user: the failure is injected into os.scandir)."""
  root, _ = tree
  real = os.scandir
  directories = [d for d, _, _ in os.walk(root)]
  assert len(directories) > 3
  for blocked in directories:
    def scandir(path='.', blocked=blocked):
      if os.path.abspath(path) == os.path.abspath(blocked):
        raise PermissionError(13, 'Permission denied', str(path))
      return real(path)
    monkeypatch.setattr(os, 'scandir', scandir)
    with pytest.raises(errors.DataError, match=r'Cannot list .*Permission denied.*chmod'):
      _source(_config(root, cache_dir=str(tmp_path / 'c'))).load('train')
    monkeypatch.setattr(os, 'scandir', real)
