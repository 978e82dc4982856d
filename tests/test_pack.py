"""Packed shards: `--mode=pack` (data/pack.py) and the packed source (data/packed.py).

What a packed copy must keep: the same examples, labels and order as the source
(so every mode gives the source's results, exactly when no image needed a
resize), pixels within JPEG's quantisation bound when an image is re-encoded,
and, when something goes wrong, one message naming the file and the fix with
nothing already written lost.
"""

import errno
import io
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from configs import tiny
from moco_jax.core import errors
from moco_jax.data import pack
from moco_jax.core import files
from moco_jax.data import packed
from moco_jax.data import sources
from moco_jax.data import spec as spec_lib
from moco_jax.evaluation import export
from moco_jax.evaluation import knn
from moco_jax.evaluation import linear_probe
from moco_jax.evaluation import report
from moco_jax import pretrain

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _photo(rng, width, height):
  small = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
  return Image.fromarray(small).resize((width, height), Image.BICUBIC)


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
  """ROOT/{train,val}/classN/*.jpg (30x40 / 40x30 px: no resize at pack_side 32) + a broken file."""
  root = tmp_path_factory.mktemp('pack') / 'tree'
  rng = np.random.default_rng(0)
  for split, count in (('train', 12), ('val', 4)):
    for c in range(4):
      folder = root / split / f'class{c}'
      folder.mkdir(parents=True)
      for i in range(count):
        image = np.asarray(_photo(rng, 40 if i % 2 else 30, 30 if i % 2 else 40), np.int32)
        image[..., c % 3] = np.clip(image[..., c % 3] + 60 * (c + 1), 0, 255)
        Image.fromarray(image.astype(np.uint8)).save(folder / f'{i}.jpg', quality=90)
  (root / 'train' / 'class1' / 'broken.jpg').write_bytes(b'not a jpeg')
  return root


def _config(path, tmp_path, **overrides):
  config = tiny.get_config()
  config.data.path = str(path)
  config.data.image_size = 16
  config.data.pack_side = 32
  config.data.cache_dir = str(tmp_path / 'cache')
  config.data.num_workers = 2
  config.data.stream_processes = 0
  config.batch_size = 16
  config.moco.queue_size = 32
  config.eval.random_init = True
  config.eval.batch_size = 10
  config.eval.knn_k = 10
  config.eval.linear_epochs = 2
  for key, value in overrides.items():
    section, _, field = key.rpartition('.')
    (config[section] if section else config)[field] = value
  return config


@pytest.fixture(scope='module')
def packed_dir(tree, tmp_path_factory):
  out = tmp_path_factory.mktemp('packed') / 'out'
  pack.run_pack(_config(tree, tmp_path_factory.mktemp('c')), str(out))
  return out


def test_pack_keeps_examples_labels_order_and_small_jpegs_byte_for_byte(tree, packed_dir, tmp_path):
  manifest = packed.read_manifest(str(packed_dir))
  assert manifest['splits']['train']['count'] == 48 and manifest['splits']['train']['skipped'] == 1
  assert manifest['splits']['val']['count'] == 16
  assert manifest['class_names'] == [f'class{c}' for c in range(4)]
  assert not os.path.exists(packed_dir / pack.STATE_DIR)
  assert sources.from_config(_config(packed_dir, tmp_path)).spec.kind == 'packed'
  assert manifest['pack_side'] == 32 and manifest['quality'] == pack.QUALITY >= 90
  source = sources.from_config(_config(packed_dir, tmp_path)).open('train')
  want = sorted(p.relative_to(tree).as_posix() for p in (tree / 'train').glob('*/*.jpg')
                if p.name != 'broken.jpg')
  assert [source.name(i) for i in range(len(source))] == want  # The source's order.
  for i in range(len(source)):
    name = source.name(i)
    assert source.label(i) == int(name.split('/')[1][len('class'):])
    assert source.read(i) == (tree / name).read_bytes()  # Short side 30 <= 32: kept as is.


def test_the_auto_canvas_of_a_packed_copy_holds_3_to_2_photos_whole(packed_dir, tmp_path):
  """data.canvas_side=0: 1.5 x the manifest's pack side, up to a multiple of 32; 512 elsewhere;
  a configured side wins."""
  config = _config(packed_dir, tmp_path, **{'data.canvas_side': 0})
  assert sources.from_config(config).spec.canvas_side == 64  # 1.5 x 32 = 48 -> 64.
  config.data.path = str(tmp_path)
  assert sources.from_config(config).spec.canvas_side == spec_lib.DEFAULT_CANVAS == 512
  assert spec_lib.canvas_side(0, 'packed', str(packed_dir)) == 64
  assert spec_lib.canvas_side(0, 'packed', '/nowhere') == 512  # The reader names it.
  for side, want in ((256, 384), (250, 384), (224, 352), (320, 480), (43, 96), (1, 32)):
    manifest = tmp_path / str(side)
    manifest.mkdir()
    (manifest / 'manifest.json').write_text(json.dumps({'pack_side': side}))
    got = spec_lib.canvas_side(0, 'packed', str(manifest))
    assert got == want and got % 32 == 0 and got >= 1.5 * side, (side, got)
  assert spec_lib.canvas_side(100, 'packed', str(packed_dir)) == 100


@pytest.mark.slow
def test_every_mode_on_a_packed_copy_gives_the_source_results(tree, packed_dir, tmp_path):
  """Same bytes, labels and order: kNN, both linear protocols' inputs, training are equal."""
  src, pk = _config(tree, tmp_path), _config(packed_dir, tmp_path)
  assert knn.run_knn(pk, str(tmp_path / 'k_pk')) == knn.run_knn(src, str(tmp_path / 'k_src'))
  streamed = _config(packed_dir, tmp_path, **{'data.max_in_memory_gb': 0.0})
  assert knn.run_knn(streamed, str(tmp_path / 'k_stream')) == knn.run_knn(
      src, str(tmp_path / 'k_src2'))
  assert (linear_probe.run_linear_eval(pk, str(tmp_path / 'l_pk'))
          == linear_probe.run_linear_eval(src, str(tmp_path / 'l_src')))
  paper = {'eval.linear_protocol': 'paper', 'eval.linear_epochs': 1, 'eval.linear_batch_size': 16}
  assert (linear_probe.run_linear_eval(_config(packed_dir, tmp_path, **paper), str(tmp_path / 'p_pk'))
          == linear_probe.run_linear_eval(_config(tree, tmp_path, **paper), str(tmp_path / 'p_src')))
  # Training: the same losses step by step (in memory), and a streamed run reads the shards.
  losses = {}
  for name, config in (('src', src), ('pk', pk)):
    config = _config(config.data.path, tmp_path, num_train_steps=2, log_every_steps=1, **{
        'eval.knn_every_epochs': 0, 'eval.random_init': False})
    pretrain.train_and_evaluate(config, str(tmp_path / f't_{name}'))
    rows = [json.loads(l) for l in open(tmp_path / f't_{name}' / 'metrics.jsonl')]
    losses[name] = [r['train_loss'] for r in rows if 'train_loss' in r]
  assert losses['pk'] == losses['src'] and len(losses['pk']) == 2
  config = _config(packed_dir, tmp_path, num_train_steps=1, **{
      'eval.knn_every_epochs': 0, 'eval.random_init': False, 'data.max_in_memory_gb': 0.0})
  pretrain.train_and_evaluate(config, str(tmp_path / 't_stream'))
  assert os.path.exists(report.run_report(config, str(tmp_path / 't_stream')))
  assert os.path.exists(export.run_export(config, str(tmp_path / 't_stream')))


def _oscillation(channel, radius):
  """max - min of `channel` over the (2 radius + 1)^2 window around each pixel (edge-padded)."""
  padded = np.pad(channel, radius, mode='edge')
  windows = np.lib.stride_tricks.sliding_window_view(padded, (2 * radius + 1,) * 2)
  return windows.max(axis=(-1, -2)) - windows.min(axis=(-1, -2))


def test_re_encoded_pixels_are_within_the_jpeg_error_bound(tmp_path):
  """A PNG at short side == pack_side is re-encoded only (no resize): the decoded split differs
  from the source's by JPEG's error, bounded from the file's own tables and the image itself.

  Bound, in RMS over an image: (1) quantisation: each DCT coefficient is off by at most q/2
  (q its table step) and JPEG's 8x8 DCT is orthonormal, so a channel's RMS error is at most
  sqrt(mean_k (q_k / 2)^2) (table 0 for Y, 1 for Cb and Cr). (2) 4:2:0 chroma: the encoder
  averages 2x2 blocks and the decoder's upsampling interpolates neighbouring averages, both
  convex combinations of source pixels within 2 px, so a chroma value is off by at most the
  chroma's oscillation (max - min) over the 5x5 window around it: RMS of that, from the
  source (0 for grey images, whose constant chroma blocks also quantise exactly). (3) RGB = Y + a Cb + b Cr with |a| + |b| <= 1.772 (B; G 1.058, R 1.402), so an RGB
  channel's RMS error <= RMS_Y + 1.772 RMS_C, plus 1.5 for three roundings (colour conversion
  on encode and decode, the integer IDCT). (4) Decoding to S x S is an antialiased resize
  whose weights are non-negative and sum to 1 (convex: RMS does not grow, by Jensen); both
  sides round once more (+1).
  """
  side = 64
  rng = np.random.default_rng(1)
  root = tmp_path / 'png'
  for split in ('train', 'val'):
    for c in range(2):
      (root / split / f'c{c}').mkdir(parents=True)
      for i in range(3):  # Smooth colour fields (c0) and grey photos with texture (c1).
        width = side + 16 * i
        if c == 0:
          field = rng.integers(0, 256, (2, 2, 3), dtype=np.uint8)
          image = Image.fromarray(field).resize((width, side), Image.BILINEAR)
        else:
          image = _photo(rng, width, side).convert('L').convert('RGB')
        image.save(root / split / f'c{c}' / f'{i}.png')
  config = _config(root, tmp_path, **{'data.pack_side': side, 'data.cache_size': 48})
  out = tmp_path / 'out'
  pack.run_pack(config, str(out))
  source = sources.from_config(_config(out, tmp_path)).open('train')
  want = sources.from_config(config).load('train')
  got = sources.from_config(_config(out, tmp_path, **{'data.cache_size': 48})).load('train')
  np.testing.assert_array_equal(got.labels, want.labels)
  diff = got.images.astype(np.float64) - want.images.astype(np.float64)
  per_image_rms = np.sqrt(np.mean(diff ** 2, axis=(1, 2, 3)))
  for i in range(len(source)):
    jpeg = Image.open(io.BytesIO(source.read(i)))
    original = Image.open(root / source.name(i))
    assert jpeg.format == 'JPEG' and jpeg.size == original.size  # Short side 64: no resize.
    quant = [np.sqrt(np.mean((np.asarray(jpeg.quantization[t], np.float64) / 2) ** 2))
             for t in (0, 1)]
    ycc = np.asarray(original.convert('YCbCr'), np.float64)
    if np.ptp(ycc[..., 1:]) == 0:  # Grey: constant chroma blocks quantise exactly (DC only).
      bound = quant[0] + 1.5 + 1.0
    else:
      chroma = max(np.sqrt(np.mean(_oscillation(ycc[..., c], 2) ** 2)) for c in (1, 2))
      bound = quant[0] + 1.772 * (quant[1] + chroma) + 1.5 + 1.0
      # The bound can fail: swapping red and blue would be far outside it.
      swapped = want.images[i].astype(np.float64)[..., ::-1] - want.images[i]
      assert np.sqrt(np.mean(swapped ** 2)) > bound
    assert per_image_rms[i] <= bound, (i, per_image_rms[i], bound)
  # A larger image is resized to short side == pack_side, its aspect ratio kept.
  big = root / 'train' / 'c0' / 'big.png'
  _photo(rng, 200, 128).save(big)
  assert Image.open(io.BytesIO(pack.reencode(big.read_bytes(), side))).size == (100, 64)


def _shard_paths(out):
  return sorted(p for p in os.listdir(out) if p.endswith('.array_record'))


def test_a_stopped_pack_resumes_keeping_verified_shards(tree, packed_dir, tmp_path, monkeypatch,
                                                        caplog):
  monkeypatch.setattr(pack, 'SHARD_IMAGES', 8)
  config = _config(tree, tmp_path)
  whole = tmp_path / 'whole'
  pack.run_pack(config, str(whole))
  real, calls = pack._write_shard, []

  def disk_full_at_third(path, records):
    calls.append(path)
    if len(calls) == 3:
      with open(path + '.tmp', 'wb') as f:  # A partial temporary file, as a full disk leaves.
        f.write(b'partial')
      raise OSError(errno.ENOSPC, 'No space left on device')
    return real(path, records)

  out = tmp_path / 'out'
  monkeypatch.setattr(pack, '_write_shard', disk_full_at_third)
  with pytest.raises(errors.DataError, match=r'Cannot write .*train-00002-of-00007.array_record.*'
                     r'No space left.*rerun the same command.*keeps its 2 finished shards'):
    pack.run_pack(config, str(out))
  assert _shard_paths(out) == [f'train-0000{k}-of-00007.array_record' for k in (0, 1)]
  assert not packed.is_packed(str(out)) and not any(p.endswith('.tmp') for p in os.listdir(out))
  kept = {p: files.sha256_of(str(out / p)) for p in _shard_paths(out)}
  with open(out / _shard_paths(out)[1], 'r+b') as f:  # A shard damaged while stopped is redone.
    f.seek(100)
    f.write(b'\0' * 8)
  monkeypatch.setattr(pack, '_write_shard', real)
  with caplog.at_level('INFO'):
    pack.run_pack(config, str(out))
  messages = [r.getMessage() for r in caplog.records]
  assert any('shard 1/7 kept (checksum verified)' in m for m in messages)
  assert any('shard 2/7 written' in m for m in messages)
  # The resumed pack is the uninterrupted one, file for file.
  assert packed.read_manifest(str(out))['splits'] == packed.read_manifest(str(whole))['splits']
  assert files.sha256_of(str(out / _shard_paths(out)[0])) == kept[_shard_paths(out)[0]]
  # Packing again into a complete pack of the same source verifies it and writes nothing.
  before = {p: os.path.getmtime(out / p) for p in os.listdir(out)}
  pack.run_pack(config, str(out))
  assert {p: os.path.getmtime(out / p) for p in os.listdir(out)} == before


def test_a_non_empty_directory_or_another_source_is_refused_unchanged(tree, packed_dir, tmp_path):
  out = tmp_path / 'busy'
  out.mkdir()
  (out / 'notes.txt').write_text('mine')
  with pytest.raises(errors.DataError, match=r'busy is not empty .*new or empty directory'):
    pack.run_pack(_config(tree, tmp_path), str(out))
  assert os.listdir(out) == ['notes.txt']
  before = sorted(os.listdir(packed_dir))
  with pytest.raises(errors.DataError, match='pack of another source or with other settings'):
    pack.run_pack(_config(tree, tmp_path, **{'data.pack_side': 64}), str(packed_dir))
  assert sorted(os.listdir(packed_dir)) == before
  with pytest.raises(errors.DataError, match='is already packed'):
    pack.run_pack(_config(packed_dir, tmp_path), str(tmp_path / 'again'))


@pytest.fixture
def copy_of(packed_dir, tmp_path):
  import shutil
  out = tmp_path / 'copy'
  shutil.copytree(packed_dir, out)
  return out


def test_a_truncated_shard_is_one_message_naming_it(copy_of, tmp_path):
  shard = copy_of / _shard_paths(copy_of)[0]
  data = shard.read_bytes()
  shard.write_bytes(data[:len(data) // 2])
  for split in ('train',):
    with pytest.raises(errors.DataError, match=rf'{shard} is truncated.*--mode=pack'):
      sources.from_config(_config(copy_of, tmp_path)).open(split)
    with pytest.raises(errors.DataError, match=rf'{shard} is truncated'):
      sources.from_config(_config(copy_of, tmp_path)).load(split)


def test_a_corrupt_shard_is_found_by_checksum_and_by_record_crc(copy_of, tmp_path):
  shard = copy_of / _shard_paths(copy_of)[0]
  data = bytearray(shard.read_bytes())
  record = packed.PackedReader(str(copy_of), 'train', packed.read_manifest(str(copy_of)))
  image = record.read(5)
  at = bytes(data).find(image)  # Inside record 5's JPEG bytes: the file keeps its size.
  assert at > 0
  data[at + len(image) // 2] ^= 0xFF
  shard.write_bytes(bytes(data))
  with pytest.raises(errors.DataError, match=rf'{shard} is corrupt: its SHA-256'):
    sources.from_config(_config(copy_of, tmp_path)).load('train')
  source = sources.from_config(_config(copy_of, tmp_path)).open('train')
  source.read(4)
  with pytest.raises(errors.DataError, match=rf'Record 5 .* is corrupt .* in {shard}'):
    source.read(5)


def test_a_manifest_that_does_not_match_is_one_message(copy_of, tmp_path):
  path = copy_of / packed.MANIFEST
  manifest = json.loads(path.read_text())
  manifest['splits']['train']['count'] += 1
  path.write_text(json.dumps(manifest))
  with pytest.raises(errors.DataError, match=rf'{path} does not match the packed format.*'
                     'shard counts add up to 48, not 49.*--mode=pack'):
    sources.from_config(_config(copy_of, tmp_path)).open('train')
  path.write_text('{"format": "moco_jax-packed", "vers')
  with pytest.raises(errors.DataError, match=rf'{path} is not a readable manifest'):
    sources.from_config(_config(copy_of, tmp_path)).load('eval')


def test_main_pack_into_a_non_empty_dir_is_one_line_and_exit_2(tree, tmp_path):
  out = tmp_path / 'busy'
  out.mkdir()
  (out / 'keep.txt').write_text('x')
  proc = subprocess.run(
      [sys.executable, 'main.py', '--mode=pack', '--config=configs/tiny.py',
       f'--config.data.path={tree}', f'--workdir={out}'], cwd=_ROOT, capture_output=True,
      text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.startswith('Error (')]
  assert len(lines) == 1 and str(out) in lines[0] and 'new or empty directory' in lines[0]
  assert os.listdir(out) == ['keep.txt']


def test_an_archive_packs_to_the_same_records_as_its_directory(tree, packed_dir, tmp_path):
  import tarfile
  archive = tmp_path / 'tree.tgz'
  with tarfile.open(archive, 'w:gz') as tar:
    tar.add(tree, arcname='tree')
  out = tmp_path / 'from_archive'
  pack.run_pack(_config(archive, tmp_path), str(out))
  for which in ('train', 'eval'):
    got = sources.from_config(_config(out, tmp_path)).open(which)
    want = sources.from_config(_config(packed_dir, tmp_path)).open(which)
    assert len(got) == len(want) and got.class_names == want.class_names
    for i in range(len(want)):
      label, name, image = got.record(i)
      assert (label, image) == want.record(i)[::2] and name.endswith(want.name(i))


def test_a_tfds_dataset_packs_through_its_data_source(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  from unittest import mock  # pylint: disable=g-import-not-at-top
  config = _config('', tmp_path, **{'data.source': 'tfds', 'data.name': 'imagenet2012'})
  out = tmp_path / 'out'
  from moco_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=12), \
      mock.patch.object(tfds.core.DatasetBuilder, 'is_prepared', return_value=True), \
      mock.patch.object(tfds_source, 'split_counts', return_value={'train': 12}):
    pack.run_pack(config, str(out))
    want = sources.from_config(config).open('train')
    want_labels = [want.label(i) for i in range(len(want))]
  got = sources.from_config(_config(out, tmp_path)).open('train')
  assert len(got) == 12 and len(got.class_names) == 1000
  assert [got.label(i) for i in range(12)] == want_labels
  assert packed.read_manifest(str(out))['source']['name'] == 'imagenet2012'
