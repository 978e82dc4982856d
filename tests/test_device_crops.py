"""Crops on the device for streamed input (data.stream_crops='device') and data.decoder.

The host decodes each image into a padded canvas (moco_jax/data/canvas_loader.py);
the step draws both RandomResizedCrop boxes over the true size and cuts them
(augment.two_views_from_canvas). Checked here: the boxes follow the host-crop
path's law (the same box for the same uniforms), the pixels are within a
derived bound of Pillow's resize and of torchvision's RandomResizedCrop on the
same box (torchvision's own pixels: tests/data/torchvision_resized_crop.npz from
tools/make_resized_crop_golden.py), the views equal the in-memory path's, the
loader's order / resume / process slices, 1 vs 8 devices, and simplejpeg's pixels.
"""

import functools
import io
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

import rounding
from configs import default
from configs import tiny
from moco_jax.augmentation import augment
from moco_jax.augmentation import image_ops
from moco_jax.core import parallel
from moco_jax.data import batching
from moco_jax.data import canvas_loader
from moco_jax.data import decoders
from moco_jax.data import host_crops
from moco_jax.data import sources
from moco_jax.data import spec as data_spec
from moco_jax.training import optim
from moco_jax.training import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCALE, RATIO = (0.2, 1.0), (3 / 4, 4 / 3)
# Pillow resamples 8-bit images in two passes (columns, then rows), each
# rounded to uint8 with coefficients in 22-bit fixed point: the first pass is
# off by <= 1/2 level + d, the second carries that through a convex
# combination and rounds again, <= 1 level + 2d in all, d = (taps x 255) x
# 2^-22 <= 2.5e-3 levels for <= 40 taps. The device side is float32
# (relative 2^-24 per operation, ~1e-5 levels). So |device - Pillow| <= (1 + 0.01) / 255.
PIL_TOLERANCE = 1.01 / 255


def _photo(rng, width, height) -> Image.Image:
  """A smooth random photo-like image with fine texture."""
  small = rng.integers(0, 256, (max(2, height // 12), max(2, width // 12), 3), dtype=np.uint8)
  base = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), np.int16)
  grain = rng.integers(-12, 13, (height, width, 3))
  return Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))


def _jpeg(image: Image.Image, **kwargs) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format='JPEG', **dict(dict(quality=90), **kwargs))
  return buf.getvalue()


# --------------------------------------------------------------------------
# The boxes: the host path's law.


def test_device_boxes_are_the_host_boxes_for_the_same_uniforms():
  """crop_box_in with a traced size == host_crops.crop_box, including late tries and the fallback."""
  rng = np.random.default_rng(0)
  u = rng.random((400, host_crops.CROP_UNIFORMS), dtype=np.float32)
  u[:150, :host_crops.CROP_TRIES] = 0.99  # Large areas: late tries and the fallback.
  sizes = [(375, 500), (500, 333), (20, 200), (3, 7), (512, 512), (1, 1), (200, 20), (7, 512)]
  # A grid of extreme aspects: with scale (0.9, 1) few draws fit and the fallback's
  # ratio clamp is taken (the float32 twin of crop_fallback.fallback_box).
  sizes += [(h, w) for h in (1, 2, 5, 13, 64, 301) for w in (1, 3, 17, 100, 450)]
  box_in = jax.jit(jax.vmap(functools.partial(image_ops.crop_box_in, scale=SCALE, ratio=RATIO)))
  box_fallback = jax.jit(jax.vmap(functools.partial(image_ops.crop_box_in, scale=(0.9, 1.0),
                                                    ratio=RATIO)))
  for height, width in sizes:
    hs, ws = np.full(len(u), height, np.int32), np.full(len(u), width, np.int32)
    device = np.asarray(box_in(u, hs, ws)).astype(np.int64)
    host = np.stack([host_crops.crop_box(x, height, width, SCALE, RATIO) for x in u])
    np.testing.assert_array_equal(device, host, err_msg=f'{height}x{width}')
    device = np.asarray(box_fallback(u, hs, ws)).astype(np.int64)
    host = np.stack([host_crops.crop_box(x, height, width, (0.9, 1.0), RATIO) for x in u])
    np.testing.assert_array_equal(device, host, err_msg=f'fallback {height}x{width}')


def test_the_step_draws_the_host_law_from_its_example_keys():
  """The boxes two_views_from_canvas cuts are crop_box(uniforms of the view's key, true size)."""
  aug = default.get_config().aug
  sizes = np.array([[375, 500], [500, 333], [40, 30], [512, 300]], np.int32)
  ids = jnp.arange(4) + 10
  rng = jax.random.key(7)
  boxes = np.asarray(augment.crop_boxes_from_canvas(rng, sizes, ids, aug)).astype(np.int64)
  keys = augment._view_keys(rng, ids)  # pylint: disable=protected-access
  n = augment._view_uniforms(aug)  # pylint: disable=protected-access
  for view in range(2):
    for i, (h, w) in enumerate(sizes):
      u = np.asarray(jax.random.uniform(keys[view * 4 + i], (n,)))[:host_crops.CROP_UNIFORMS]
      np.testing.assert_array_equal(boxes[view, i], host_crops.crop_box(u, h, w, SCALE, RATIO))
  # The law is the host's, not one draw: the boxes of 2,000 keys cover the scale range.
  many = np.asarray(augment.crop_boxes_from_canvas(
      rng, np.tile([[375, 500]], (1000, 1)).astype(np.int32), jnp.arange(1000), aug))
  area = many[..., 2] * many[..., 3] / (375 * 500)
  assert area.min() >= 0.2 - 0.01 and area.max() <= 1.0 and np.median(area) > 0.4


# --------------------------------------------------------------------------
# The pixels.


def _device_crop(image: np.ndarray, box, side: int, size: int) -> np.ndarray:
  h, w = image.shape[:2]
  canvas = np.full((side, side, 3), 255, np.uint8)  # Padding that would show if it leaked in.
  canvas[:h, :w] = image
  out = image_ops.canvas_resized_crop(jnp.asarray(canvas, jnp.float32) / 255.0,
                                      jnp.asarray(box, jnp.float32), jnp.int32(h),
                                      jnp.int32(w), size)
  return np.asarray(out)


def _interior(length: int, size: int) -> np.ndarray:
  """Output samples whose bilinear support lies inside a box of `length` (torchvision crops first)."""
  scale = length / size
  support = max(scale, 1.0)
  centre = (np.arange(size) + 0.5) * scale
  return (centre - support >= 0) & (centre + support <= length)


@pytest.mark.parametrize('size', [16, 48])
def test_device_crop_is_pillows_and_torchvisions_resize_of_the_box(size):
  """Within PIL_TOLERANCE of Pillow's resize(box=...) (the host crops) everywhere, and of
  torchvision's RandomResizedCrop on the same box (its PIL path: img.crop(box).resize) on
  every output pixel whose filter does not reach outside the box."""
  rng = np.random.default_rng(1)
  for height, width in ((75, 100), (100, 67), (33, 21)):
    photo = _photo(rng, width, height)
    image = np.asarray(photo)
    u = rng.random((12, host_crops.CROP_UNIFORMS), dtype=np.float32)
    for x in u:  # Down- and upsampling boxes, at the image's right and bottom edges too.
      top, left, h, w = (int(v) for v in host_crops.crop_box(x, height, width, SCALE, RATIO))
      got = _device_crop(image, (top, left, h, w), 128, size)
      box = (left, top, left + w, top + h)
      host = np.asarray(photo.resize((size, size), Image.BILINEAR, box=box)) / 255.0
      assert np.abs(got - host).max() <= PIL_TOLERANCE, (height, width, box)
      torchvision = np.asarray(photo.crop(box).resize((size, size), Image.BILINEAR)) / 255.0
      inside = _interior(h, size)[:, None] & _interior(w, size)[None, :]
      assert inside.any()
      assert np.abs(got - torchvision)[inside].max() <= PIL_TOLERANCE, (height, width, box)


def test_device_crop_is_within_the_bound_of_torchvisions_own_pixels():
  """Against torchvision's RandomResizedCrop itself (golden: tools/make_resized_crop_golden.py):
  its boxes, cut from the canvas on the device, within PIL_TOLERANCE of its pixels wherever
  the filter stays inside the box (torchvision crops first; the device, as Pillow's
  resize(box=...), also weighs the real pixels just outside)."""
  golden = np.load(ROOT / 'tests' / 'data' / 'torchvision_resized_crop.npz')
  canvases, sizes = golden['canvases'], golden['sizes']
  crop = jax.jit(jax.vmap(image_ops.canvas_resized_crop, in_axes=(0, 0, 0, 0, None)),
                 static_argnums=4)
  for size in (16, 48):
    boxes, want, which = golden[f'boxes_{size}'], golden[f'crops_{size}'], golden[f'image_{size}']
    got = np.asarray(crop(jnp.asarray(canvases[which], jnp.float32) / 255.0,
                          jnp.asarray(boxes, jnp.float32), jnp.asarray(sizes[which, 0]),
                          jnp.asarray(sizes[which, 1]), size))
    for g, w, (_, _, h, bw) in zip(got, want / 255.0, boxes):
      inside = _interior(int(h), size)[:, None] & _interior(int(bw), size)[None, :]
      assert inside.any()
      assert np.abs(g - w)[inside].max() <= PIL_TOLERANCE, (size, h, bw)


def test_canvas_views_equal_the_in_memory_views():
  """Images in canvases with their true size == the same images on the in-memory path."""
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (6, 40, 40, 3), dtype=np.uint8)
  aug = default.get_config().aug
  ids = jnp.arange(6) + 3
  key = jax.random.key(5)
  want = jax.jit(functools.partial(augment.two_views, aug_config=aug, image_size=24))(
      key, images, ids)
  canvases = np.zeros((6, 64, 64, 3), np.uint8)
  canvases[:, :40, :40] = images
  canvases[:, 40:, :] = 200  # The padding must not matter.
  sizes = np.full((6, 2), 40, np.int32)
  got = jax.jit(functools.partial(augment.two_views_from_canvas, aug_config=aug,
                                  image_size=24))(key, canvases, sizes, ids)
  # The boxes are the same float32 computation; the resizes (scale_and_translate vs two
  # weight matmuls) are convex sums of <= 64 terms in float32: <= 2 * 64 * 2^-24 apart
  # (8e-6). Jitter's blends scale a difference by at most 1.4 each (3) and the hue
  # rotation by <= 3; Normalize divides by std >= 0.224: 8e-6 * 1.4^3 * 3 / 0.224 = 3e-4.
  bound = 2 * 64 * 2.0**-24 * 1.4**3 * 3 / 0.224
  for a, b in zip(want, got):
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= bound


# --------------------------------------------------------------------------
# The host side: decoding into canvases, simplejpeg.


def test_decode_into_fits_pads_and_reduces_large_images_once():
  rng = np.random.default_rng(3)
  canvas = np.full((64, 64, 3), 7, np.uint8)
  photo = _photo(rng, 50, 30)
  data = _jpeg(photo)
  assert canvas_loader.decode_into(data, canvas) == (30, 50, False)
  # No draft: a full decode, exactly Pillow's pixels; the rest of the canvas zero.
  np.testing.assert_array_equal(canvas[:30, :50], np.asarray(Image.open(io.BytesIO(data))))
  assert not canvas[30:].any() and not canvas[:30, 50:].any()
  # 200x120 > 64: the JPEG draft at 1/4 (50x30) fits; 600x90 needs 1/8 then a resize.
  big = _jpeg(_photo(rng, 200, 120))
  assert canvas_loader.fit_scale(200, 120, 64) == 4
  assert canvas_loader.decode_into(big, canvas) == (30, 50, True)
  drafted = Image.open(io.BytesIO(big))
  drafted.draft('RGB', (50, 30))
  np.testing.assert_array_equal(canvas[:30, :50], np.asarray(drafted.convert('RGB')))
  assert canvas_loader.decode_into(_jpeg(_photo(rng, 600, 90)), canvas) == (10, 64, True)
  png = io.BytesIO()
  _photo(rng, 100, 40).save(png, format='PNG')  # Not a JPEG: resized to fit.
  assert canvas_loader.decode_into(png.getvalue(), canvas) == (26, 64, True)
  assert canvas_loader.decode_into(b'\xff\xd8\xff junk', canvas) is None


@pytest.mark.parametrize('decoder', ['pillow', 'simplejpeg'])
def test_simplejpeg_decodes_pillows_pixels(decoder):
  """Equal pixels (both are libjpeg-turbo, accurate DCT, fancy upsampling), at every DCT scale."""
  pytest.importorskip('simplejpeg')
  rng = np.random.default_rng(4)
  photo = _photo(rng, 203, 151)
  files = [_jpeg(photo, subsampling=s, progressive=p) for s in (0, 1, 2) for p in (False, True)]
  files += [_jpeg(photo.convert('L')), _jpeg(photo.convert('CMYK'))]  # CMYK: Pillow's route.
  for data in files:
    for target in (None, (101, 75), (50, 37), (25, 18)):
      reduce_to = None if target is None else (lambda w, h, t=target: t)
      want, size = decoders.load_rgb_array(data, reduce_to, 'pillow')
      got, got_size = decoders.load_rgb_array(data, reduce_to, decoder)
      assert got_size == size == (203, 151)
      np.testing.assert_array_equal(got, want)
  # The host-crop path through it: the same crops.
  u = host_crops.crop_uniforms(0, 0, 0)
  np.testing.assert_array_equal(host_crops.two_crops(files[0], u, 32, SCALE, RATIO, decoder),
                                host_crops.two_crops(files[0], u, 32, SCALE, RATIO))
  canvas_a, canvas_b = np.zeros((128, 128, 3), np.uint8), np.zeros((128, 128, 3), np.uint8)
  assert (canvas_loader.decode_into(files[2], canvas_a, decoder)
          == canvas_loader.decode_into(files[2], canvas_b, 'pillow') == (76, 102, True))
  np.testing.assert_array_equal(canvas_a, canvas_b)
  assert canvas_loader.decode_into(b'\xff\xd8\xff junk', canvas_a, decoder) is None


# --------------------------------------------------------------------------
# The loader.


def _tree(root, classes=3, per_class=6):
  rng = np.random.default_rng(0)
  for c in range(classes):
    folder = root / 'train' / f'class{c:04d}'
    folder.mkdir(parents=True)
    for i in range(per_class):
      size = (40, 30) if i % 2 else (30, 40)
      _photo(rng, *size).save(folder / f'{i}.jpg', quality=90)
  return root


def _source(root, tmp_path):
  config = default.get_config().data
  config.update(dict(path=str(root), image_size=16, cache_dir=str(tmp_path / 'cache'),
                     max_in_memory_gb=0.0))
  return sources.open_source(data_spec.from_config(config)).open('train')


def _take(source, steps, **kwargs):
  kwargs = dict(dict(global_batch=4, seed=3, canvas_side=48, num_threads=2), **kwargs)
  it = canvas_loader.train_batches(source, **kwargs)
  return [next(it) for _ in range(steps)]


def test_canvas_loader_order_resume_and_process_slices(tmp_path):
  source = _source(_tree(tmp_path / 'tree'), tmp_path)
  full = _take(source, 6)
  for step, batch in enumerate(full):
    assert batch['image'].shape == (4, 48, 48, 3) and batch['image'].dtype == np.uint8
    np.testing.assert_array_equal(batch['index'], batching.train_indices(18, 4, 3, step))
    np.testing.assert_array_equal(batch['label'], batch['index'] // 6)
    for j, index in enumerate(batch['index']):  # Each slot: its file, decoded whole.
      image = np.asarray(Image.open(io.BytesIO(source.read(int(index)))).convert('RGB'))
      np.testing.assert_array_equal(batch['size'][j], image.shape[:2])
      np.testing.assert_array_equal(batch['image'][j, :image.shape[0], :image.shape[1]], image)
    assert not batch['reduced'].any() and not batch['skipped'].any()
  for a, b in zip(full[4:], _take(source, 2, start_step=4)):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  for step in range(3):  # Two processes: the halves are the one-process batch.
    halves = [_take(source, 1, start_step=step, end_step=step + 1, process_index=p,
                    process_count=2, prefetch=0, num_threads=1)[0] for p in range(2)]
    for key in full[step]:
      np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), full[step][key])


def test_canvas_loader_replaces_unreadable_files_as_the_host_crop_loader(tmp_path):
  root = _tree(tmp_path / 'tree', classes=2, per_class=4)
  (root / 'train' / 'class0000' / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff' + b'x' * 50)
  source = _source(root, tmp_path)
  canvas = _take(source, 4, global_batch=3, seed=0)
  it = host_crops.train_batches(source, global_batch=3, seed=0, image_size=8, num_threads=2)
  host = [next(it) for _ in range(4)]
  assert sum(int(b['skipped'].sum()) for b in canvas) >= 1
  for a, b in zip(canvas, host):  # The same substitutes, read in the same places.
    np.testing.assert_array_equal(a['index'], b['index'])
    np.testing.assert_array_equal(a['skipped'], b['skipped'])


def test_canvas_batches_from_worker_processes_are_the_same_and_leak_no_shared_memory(tmp_path):
  """With grain worker processes the canvases are decoded straight into shared memory:
  the same batches as without workers, and every segment released by the end."""
  root = _tree(tmp_path / 'tree')
  script = tmp_path / 'workers.py'
  script.write_text(f"""
import numpy as np
from configs import default
from moco_jax.data import canvas_loader
from moco_jax.data import streaming
from moco_jax.data import sources
from moco_jax.data import spec as data_spec

def main():
  config = default.get_config().data
  config.update(dict(path={str(root)!r}, cache_dir={str(tmp_path / 'c')!r}, max_in_memory_gb=0.0))
  source = sources.open_source(data_spec.from_config(config)).open('train')
  kwargs = dict(global_batch=4, seed=0, canvas_side=48, num_threads=1)
  workers = canvas_loader.train_batches(source, num_processes=2, **kwargs)
  threads = canvas_loader.train_batches(source, num_processes=0, **kwargs)
  held = [next(workers) for _ in range(5)]  # Alive at exit, as a train loop's last batch is.
  for batch in held:
    want = next(threads)
    for key in want:
      np.testing.assert_array_equal(np.asarray(batch[key]), want[key])
  workers.close()
  print('ok')

if __name__ == '__main__':  # Grain's worker processes are spawned: they import this file.
  main()
""")
  out = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert out.returncode == 0 and out.stdout.strip().endswith('ok'), out.stderr[-3000:]
  assert 'leaked shared_memory' not in out.stderr, out.stderr[-3000:]


def test_the_trainer_says_once_that_large_images_were_reduced(tmp_path, caplog):
  """The feeder shards canvases, sizes and indices, and logs the host reduction once."""
  from moco_jax import pretrain  # pylint: disable=g-import-not-at-top
  root = _tree(tmp_path / 'tree', classes=2, per_class=8)
  _photo(np.random.default_rng(9), 130, 90).save(root / 'train' / 'class0000' / 'big.jpg')
  config = tiny.get_config()
  config.data.update(dict(path=str(root), cache_dir=str(tmp_path / 'cache'), canvas_side=48,
                          stream_processes=0, num_workers=1))
  config.batch_size = 8
  source = _source(root, tmp_path)
  spec = sources.from_config(config).spec
  feed = pretrain._canvas_feeder(config, spec, source, parallel.make_mesh(), 0, 8)  # pylint: disable=protected-access
  with caplog.at_level('INFO'):
    for step in range(8):  # 17 images, 8 per step: the big one is read at least 3 times.
      canvases, sizes, indices = feed(step)
      assert canvases.shape == (8, 48, 48, 3) and sizes.shape == (8, 2) and indices.shape == (8,)
      assert len(canvases.sharding.device_set) == len(jax.devices())
  feed.close()
  said = [r for r in caplog.records if 'larger than data.canvas_side=48' in r.getMessage()]
  assert len(said) == 1


# --------------------------------------------------------------------------
# The step: 1 vs 8 devices.


def _canvas_run(config, devices, batches, num_steps=2):
  mesh = parallel.make_mesh(devices)
  lr = optim.create_learning_rate_fn(config, steps_per_epoch=4, total_steps=8)
  tx = optim.create_optimizer(config, lr)
  setup = step_lib.make_step_setup(config, len(devices), tx, canvas=True)
  state = step_lib.init_state(config, setup, mesh)
  step = step_lib.make_sharded_step(setup, lr, mesh)
  metrics = []
  for batch in batches[:num_steps]:
    state, m = step(state, parallel.shard_batch(batch['image'], mesh),
                    parallel.shard_batch(batch['size'], mesh),
                    parallel.shard_batch(batch['index'].astype(np.int32), mesh))
    metrics.append(jax.device_get(m))
  return jax.device_get(state), metrics


def test_streamed_canvas_steps_agree_on_one_and_eight_devices(tmp_path):
  """Two steps on canvases from the loader: 1 and 8 devices agree to float64 rounding."""
  root = _tree(tmp_path / 'tree', classes=4, per_class=8)
  config = tiny.get_config()
  config.batch_size = 16
  config.moco.queue_size = 32
  config.data.image_size = 16
  batches = _take(_source(root, tmp_path), 2, global_batch=16, canvas_side=48)
  with rounding.precise(config):
    one = _canvas_run(config, jax.devices()[:1], batches)
    eight = _canvas_run(config, jax.devices(), batches)
  rounding.assert_logged_agree(eight[1], one[1])
  rounding.assert_agree_to_rounding(eight[0], one[0], 'MoCo on streamed canvases')
  assert int(one[0].step) == 2
