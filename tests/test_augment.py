"""Tests of the on-device MoCo augmentations, on real CIFAR-10 / Imagenette images.

Colour ops are checked against slow numpy ports of torchvision's tensor
formulas; geometry against exact mirrors and RandomResizedCrop's bounds; and
the views against the property the train step relies on: they depend only on
(rng, example id), not on how the batch is split over devices.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import functools  # pylint: disable=g-import-not-at-top
import io
import pathlib
import tarfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

import helpers
from configs import default
from moco_jax.augmentation import augment
from moco_jax.augmentation import image_ops

DATA = pathlib.Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
LUMA = np.array([0.2989, 0.587, 0.114])


def _first_images(archive: pathlib.Path, count: int, side: int) -> np.ndarray:
  """Decodes the first `count` JPEGs of an archive (streamed: stops early)."""
  if not archive.exists():
    pytest.skip(f'{archive} is not available')
  out = []
  with tarfile.open(archive, 'r|*') as tar:
    for member in tar:
      if member.isfile() and member.name.lower().endswith(('.jpg', '.jpeg')):
        image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert('RGB')
        out.append(np.asarray(image.resize((side, side), Image.BILINEAR)))
        if len(out) == count:
          break
  return np.stack(out)


@pytest.fixture(scope='module')
def cifar():
  """8 real CIFAR-10 images, uint8 [8, 32, 32, 3]."""
  return _first_images(DATA / 'CIFAR-10-images.tar.gz', 8, 32)


@pytest.fixture(scope='module')
def photos(cifar):
  """The same images as floats in [0, 1]."""
  return cifar.astype(np.float32) / 255.0


def _aug(**overrides) -> ml_collections.ConfigDict:
  config = default.get_config().aug
  config.update(overrides)
  return config


# Every random op off: the view is the normalised image itself.
PLAIN = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_prob=0.0, grayscale_prob=0.0,
             blur_prob=0.0, flip=False)


_JITTED = {}


def _views(images, aug_config, size=32, ids=None, seed=0, dtype=jnp.float32):
  """two_views under jit, compiled once per (config, size, dtype): compiles dominate."""
  ids = jnp.arange(len(images)) if ids is None else ids
  key = (aug_config.to_json(), size, jnp.dtype(dtype).name)
  if key not in _JITTED:
    _JITTED[key] = jax.jit(functools.partial(augment.two_views, aug_config=aug_config,
                                             image_size=size, dtype=dtype))
  return _JITTED[key](jax.random.key(seed), jnp.asarray(images), ids)


def _unnormalise(view, aug_config):
  return np.asarray(view, np.float32) * np.array(aug_config.std) + np.array(aug_config.mean)


# --------------------------------------------------------------------------
# numpy references (ports of torchvision.transforms.v2.functional, tensor path).


def _np_blend(img, other, factor):
  return np.clip(factor * img + (1 - factor) * other, 0, 1)


def _np_gray(img):
  return (img @ LUMA)[..., None]


def _np_hue(img, shift):
  r, g, b = img[..., 0], img[..., 1], img[..., 2]
  maxc, minc = img.max(-1), img.min(-1)
  eqc = maxc == minc
  cr = maxc - minc
  s = cr / np.where(eqc, 1.0, maxc)
  div = np.where(eqc, 1.0, cr)
  rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
  hr = (maxc == r) * (bc - gc)
  hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
  hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
  h = np.mod((hr + hg + hb) / 6.0 + 1.0, 1.0)
  h = np.mod(h + shift, 1.0)
  v = maxc
  i = np.floor(h * 6.0)
  f = h * 6.0 - i
  i = i.astype(int) % 6
  p = np.clip(v * (1 - s), 0, 1)
  q = np.clip(v * (1 - s * f), 0, 1)
  t = np.clip(v * (1 - s * (1 - f)), 0, 1)
  table = np.stack([np.stack(c, -1) for c in
                    ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))], -2)
  return np.take_along_axis(table, i[..., None, None].repeat(3, -2), -1)[..., 0]


# --------------------------------------------------------------------------
# Colour.


def test_brightness_contrast_saturation_match_torchvision_formulas(photos):
  for factor in (0.6, 1.0, 1.4):
    for img in photos[:3]:
      np.testing.assert_allclose(image_ops.adjust_brightness(img, factor),
                                 _np_blend(img, 0.0, factor), atol=1e-6)
      np.testing.assert_allclose(image_ops.adjust_contrast(img, factor),
                                 _np_blend(img, _np_gray(img).mean(), factor), atol=1e-5)
      np.testing.assert_allclose(image_ops.adjust_saturation(img, factor),
                                 _np_blend(img, _np_gray(img), factor), atol=1e-5)


def test_hue_matches_torchvision_and_keeps_value_and_luminance(photos):
  for shift in (-0.1, 0.03, 0.1, 0.5):
    out = np.asarray(image_ops.adjust_hue(photos, shift))
    np.testing.assert_allclose(out, _np_hue(photos.astype(np.float64), shift), atol=1e-4)
    np.testing.assert_allclose(out.max(-1), photos.max(-1), atol=1e-5)  # HSV value kept.
    np.testing.assert_allclose(out.min(-1), photos.min(-1), atol=1e-5)  # So is chroma.
  small = np.asarray(image_ops.adjust_hue(photos, 0.05))
  luma_change = np.abs(_np_gray(small) - _np_gray(photos)).mean()
  assert luma_change < 0.02, luma_change
  np.testing.assert_allclose(image_ops.adjust_hue(photos, 0.0), photos, atol=1e-5)
  # The reference round trip and the fused op agree on pure hues too.
  np.testing.assert_allclose(image_ops._hsv_to_rgb(image_ops._rgb_to_hsv(photos)), photos, atol=1e-5)


def test_jitter_slots_equal_sequential_ops_in_every_order(photos):
  img = photos[0]
  factors = jnp.array([1.3, 0.7, 1.2, 0.08])
  ops = (lambda x: image_ops.adjust_brightness(x, factors[0]),
         lambda x: image_ops.adjust_contrast(x, factors[1]),
         lambda x: image_ops.adjust_saturation(x, factors[2]),
         lambda x: image_ops.adjust_hue(x, factors[3]))
  orders = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1], [3, 0, 1, 2]])
  got = jax.jit(jax.vmap(lambda o: image_ops.color_jitter(img, factors, o)))(orders)
  for order, out in zip(orders, got):
    want = img
    for op in order:
      want = ops[op](want)
    np.testing.assert_allclose(out, want, atol=1e-5)


def test_jitter_factors_follow_torchvision_ranges():
  f = jax.vmap(lambda k: helpers.jitter_factors(k, (0.4, 0.4, 0.4, 0.1)))(
      jax.random.split(jax.random.key(0), 2000))
  assert np.all(f[:, :3] >= 0.6) and np.all(f[:, :3] <= 1.4)
  assert np.all(np.abs(f[:, 3]) <= 0.1) and f[:, 3].min() < -0.09 and f[:, 3].max() > 0.09


def test_grayscale_view_has_equal_channels(cifar):
  config = _aug(**{**PLAIN, 'grayscale_prob': 1.0, 'jitter_prob': 0.8})
  q, k = _views(cifar, config)
  for view in (q, k):
    x = _unnormalise(view, config)
    np.testing.assert_allclose(x[..., 0], x[..., 1], atol=1e-5)
    np.testing.assert_allclose(x[..., 1], x[..., 2], atol=1e-5)


# --------------------------------------------------------------------------
# Blur.


def test_blur_tiny_sigma_is_identity_and_blur_keeps_mean(photos):
  img = photos[0]
  np.testing.assert_allclose(image_ops.gaussian_blur(img, 1e-3, 3), img, atol=1e-6)
  np.testing.assert_allclose(image_ops.gaussian_blur(img, 1e-3, 13), img, atol=1e-6)
  for sigma in (0.5, 2.0):
    out = np.asarray(image_ops.gaussian_blur(img, sigma, 7))
    np.testing.assert_allclose(out.mean((0, 1)), img.mean((0, 1)), atol=5e-3)
    assert out.std() < img.std()
    # Reference: reflect-pad and convolve each row, then each column.
    w = np.asarray(image_ops._gaussian_kernel(sigma, 7))
    ref = np.pad(img, ((3, 3), (0, 0), (0, 0)), mode='reflect')
    ref = sum(w[t] * ref[t:t + 32] for t in range(7))
    ref = np.pad(ref, ((0, 0), (3, 3), (0, 0)), mode='reflect')
    ref = sum(w[t] * ref[:, t:t + 32] for t in range(7))
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_blur_kernel_size_is_about_a_tenth_and_odd():
  assert [image_ops.blur_kernel_size(s) for s in (32, 96, 128, 224)] == [3, 9, 13, 23]


# --------------------------------------------------------------------------
# Geometry.


@pytest.mark.parametrize('side', [32, 128])
def test_crop_boxes_respect_scale_and_ratio(side):
  keys = jax.random.split(jax.random.key(side), 4000)
  boxes = np.asarray(jax.vmap(lambda k: helpers.crop_box(k, side, side, (0.2, 1.0),
                                                         (3 / 4, 4 / 3)))(keys))
  top, left, h, w = boxes.T
  np.testing.assert_array_equal(boxes, np.round(boxes))
  assert np.all(top >= 0) and np.all(left >= 0)
  assert np.all(top + h <= side) and np.all(left + w <= side)
  # Rounding h and w to pixels moves area and ratio by at most half a pixel.
  area = h * w / side**2
  slack = 1.0 / side
  assert area.min() >= 0.2 - 2 * slack and area.max() <= 1.0
  ratio = w / h
  assert ratio.min() >= 3 / 4 * (1 - 2 * slack) and ratio.max() <= 4 / 3 * (1 + 2 * slack)
  assert area.min() < 0.25 and area.max() > 0.9  # The range is used, not just its middle.
  assert len(np.unique(top)) > side // 2  # Offsets spread over the image.


def test_crop_falls_back_to_a_centred_box():
  # No box of ratio 2-3 with >= 90% of the area fits a square: torchvision's fallback.
  box = helpers.crop_box(jax.random.key(0), 32, 32, (0.9, 1.0), (2.0, 3.0))
  np.testing.assert_array_equal(box, [8, 0, 16, 32])


def test_full_crop_is_identity_and_flip_is_exact_mirror(cifar, photos):
  box = jnp.array([0.0, 0.0, 32.0, 32.0])
  np.testing.assert_allclose(image_ops.resized_crop(photos[0], box, 32), photos[0], atol=1e-5)
  np.testing.assert_array_equal(image_ops.hflip(photos[0]), photos[0][:, ::-1])
  config = _aug(**{**PLAIN, 'flip': True})
  q, k = _views(cifar, config)
  plain = (photos - np.array(config.mean)) / np.array(config.std)
  flipped = 0
  for views in (np.asarray(q), np.asarray(k)):
    for view, ref in zip(views, plain):
      if np.allclose(view, ref, atol=1e-4):
        continue
      np.testing.assert_allclose(view, ref[:, ::-1], atol=1e-4)
      flipped += 1
  assert 0 < flipped < 2 * len(cifar)


def test_crop_of_a_box_matches_cropping_then_resizing(photos):
  # A 16x16 box upscaled x2 equals resizing the cut-out 16x16 patch, except
  # in the outermost output pixels: there the crop interpolates with the real
  # pixels just outside the box where crop-then-resize repeats the edge.
  box = jnp.array([4.0, 8.0, 16.0, 16.0])
  got = image_ops.resized_crop(photos[1], box, 32)
  want = jax.image.resize(photos[1][4:20, 8:24], (32, 32, 3), 'linear')
  np.testing.assert_allclose(got[1:-1, 1:-1], want[1:-1, 1:-1], atol=1e-5)


def test_upsampling_crop_fast_path_equals_scale_and_translate(photos):
  img = jnp.asarray(photos[2])
  for box in ([4, 8, 16, 16], [3, 5, 20, 27], [0, 0, 7, 31], [25, 1, 7, 9]):
    top, left, h, w = box
    want = jax.image.scale_and_translate(img, (32, 32, 3), (0, 1), jnp.array([32 / h, 32 / w]),
                                         -jnp.array([top * 32 / h, left * 32 / w]), 'linear')
    got = image_ops.resized_crop(img, jnp.array(box, jnp.float32), 32)
    np.testing.assert_allclose(got, want, atol=1e-5)
  # An image larger than the output takes the antialiased path.
  big = jax.image.resize(img, (64, 64, 3), 'linear')
  full = image_ops.resized_crop(big, jnp.array([0.0, 0.0, 64.0, 64.0]), 32)
  np.testing.assert_allclose(full, jax.image.resize(big, (32, 32, 3), 'linear'), atol=1e-5)


# --------------------------------------------------------------------------
# Views.


def test_views_differ_and_repeat_with_the_same_rng(cifar):
  config = _aug()
  q, k = _views(cifar, config, seed=0)
  q2, k2 = _views(cifar, config, seed=0)
  q3, _ = _views(cifar, config, seed=1)
  assert q.shape == k.shape == (8, 32, 32, 3) and q.dtype == jnp.float32
  np.testing.assert_array_equal(q, q2)
  np.testing.assert_array_equal(k, k2)
  assert np.abs(np.asarray(q) - np.asarray(k)).mean(axis=(1, 2, 3)).min() > 1e-3
  assert not np.allclose(q, q3)
  assert np.isfinite(np.asarray(q)).all()


def test_views_do_not_depend_on_the_device_split(cifar):
  config = _aug()
  devices = jax.devices()
  if len(devices) < 2 or len(cifar) % len(devices):
    pytest.skip('needs XLA_FLAGS=--xla_force_host_platform_device_count=8')
  images, ids = jnp.asarray(cifar), jnp.arange(len(cifar)) + 1000
  rng = jax.random.key(3)
  whole = _views(images, config, ids=ids, seed=3)
  mesh = jax.sharding.Mesh(np.array(devices), ('data',))
  spec = jax.sharding.PartitionSpec('data')
  sharded = jax.jit(jax.shard_map(
      lambda r, x, i: augment.two_views(r, x, i, config, 32), mesh=mesh,
      in_specs=(jax.sharding.PartitionSpec(), spec, spec), out_specs=(spec, spec)))
  split = sharded(rng, images, ids)
  for a, b in zip(whole, split):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_v1_config_and_bfloat16_upscaled_views(cifar):
  config = _aug(jitter=(0.4, 0.4, 0.4, 0.4), jitter_prob=1.0, blur_prob=0.0)
  q, k = _views(cifar[:4], config, size=48, dtype=jnp.bfloat16)
  assert q.shape == (4, 48, 48, 3) and q.dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(k, np.float32)).all()


def test_eval_view_is_deterministic_resize_and_normalise(cifar, photos):
  config = _aug()
  out = augment.eval_view(jnp.asarray(cifar), 32, config)
  np.testing.assert_allclose(out, (photos - np.array(config.mean)) / np.array(config.std),
                             atol=1e-5)
  small = augment.eval_view(jnp.asarray(cifar), 16, config, jnp.bfloat16)
  assert small.shape == (8, 16, 16, 3) and small.dtype == jnp.bfloat16


def test_two_views_from_host_crops_use_the_same_colour_randomness():
  """Host-cut crops (streaming) get the jitter, grayscale, blur and flip of the device path.

  With a crop of the whole image (scale 1, ratio 1) the device crop is the identity, so
  two_views on images must equal two_views_from_crops on [image, image] pairs.
  """
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
  aug = _aug(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
  ids = jnp.arange(10, 16)
  want = _views(images, aug, size=16, ids=ids, seed=3)
  crops = jnp.asarray(np.stack([images, images], axis=1))
  from_crops = jax.jit(functools.partial(augment.two_views_from_crops, aug_config=aug,
                                         image_size=16))
  got = from_crops(jax.random.key(3), crops, ids)
  for a, b in zip(want, got):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
  # Each view uses its own crop: a changed key-view crop changes only the key view.
  other = crops.at[:, 1].set(255 - crops[:, 1])
  q, k = from_crops(jax.random.key(3), other, ids)
  np.testing.assert_allclose(np.asarray(q), np.asarray(got[0]), atol=1e-5)
  assert not np.allclose(np.asarray(k), np.asarray(got[1]))
