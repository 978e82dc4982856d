"""The per-image ops of MoCo's augmentations, with torchvision's tensor semantics.

Each op works on one float image [H, W, 3] in [0, 1] (vmapped over a batch by
`moco_jax.augmentation.augment`) with static shapes, so a per-example random choice is a
`jnp.where` and XLA sees one program. The formulas are those of
`torchvision.transforms.v2.functional` on tensors; `augment`'s docstring lists
the deliberate differences from the PIL pipeline the paper used.
"""

import math

import jax
import jax.numpy as jnp

from moco_jax.augmentation import crop_fallback

# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)
# Boxes tried by RandomResizedCrop before it falls back to a centre crop.
_CROP_TRIES = 10
# Uniforms a crop consumes: 10 areas, 10 log-ratios, top, left.
CROP_UNIFORMS = 2 * _CROP_TRIES + 2


# --------------------------------------------------------------------------
# Geometry.


def crop_box_from_uniforms(u: jax.Array, height: int, width: int, scale, ratio) -> jax.Array:
  """RandomResizedCrop's box from `CROP_UNIFORMS` uniforms in [0, 1).

  torchvision tries up to 10 (area, log-aspect) draws and keeps the first box
  that fits, else falls back to the largest centred box with a clamped ratio.
  Here all 10 draws are made at once and the first valid one is selected, so
  the function has static shapes and vmaps.
  """
  u_area, u_ratio = u[:_CROP_TRIES], u[_CROP_TRIES:2 * _CROP_TRIES]
  u_top, u_left = u[2 * _CROP_TRIES], u[2 * _CROP_TRIES + 1]
  area = height * width * (scale[0] + (scale[1] - scale[0]) * u_area)
  lo, hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(lo + (hi - lo) * u_ratio)
  w = jnp.round(jnp.sqrt(area * aspect))
  h = jnp.round(jnp.sqrt(area / aspect))
  valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = jnp.argmax(valid)
  w, h = w[first], h[first]
  # torch.randint(0, H - h + 1): uniform over the valid offsets.
  top = jnp.minimum(jnp.floor(u_top * (height - h + 1)), height - h)
  left = jnp.minimum(jnp.floor(u_left * (width - w + 1)), width - w)
  # Fallback: whole image, trimmed to the nearest allowed ratio, centred.
  fallback = jnp.array(crop_fallback.fallback_box(height, width, ratio), jnp.float32)
  box = jnp.stack([top, left, h, w]).astype(jnp.float32)
  return jnp.where(valid.any(), box, fallback)


def crop_box_in(u: jax.Array, height: jax.Array, width: jax.Array, scale, ratio) -> jax.Array:
  """`crop_box_from_uniforms` for an image whose size is traced: int32 `height`, `width`.

  The streamed canvas path (`canvas_views`): every example sits in the same
  padded canvas, with its own true size. The same float32 arithmetic as
  `crop_box_from_uniforms` and `host_crops.crop_box` (so the same box for the
  same uniforms), and the fallback of `crop_fallback.fallback_box` in float32
  (Python's float64 there: the two agree whenever no ratio product lands within
  float32 rounding of a .5 tie, which `tests/test_device_crops.py` checks on a
  grid of sizes for the default ratios).
  """
  f32 = jnp.float32
  height, width = jnp.asarray(height, jnp.int32), jnp.asarray(width, jnp.int32)
  hf, wf = height.astype(f32), width.astype(f32)
  u_area, u_ratio = u[:_CROP_TRIES], u[_CROP_TRIES:2 * _CROP_TRIES]
  u_top, u_left = u[2 * _CROP_TRIES], u[2 * _CROP_TRIES + 1]
  area = (height * width).astype(f32) * (f32(scale[0]) + f32(scale[1] - scale[0]) * u_area)
  lo, hi = f32(math.log(ratio[0])), f32(math.log(ratio[1]))
  aspect = jnp.exp(lo + (hi - lo) * u_ratio)
  w = jnp.round(jnp.sqrt(area * aspect))
  h = jnp.round(jnp.sqrt(area / aspect))
  valid = (w > 0) & (w <= wf) & (h > 0) & (h <= hf)
  first = jnp.argmax(valid)
  w, h = w[first], h[first]
  top = jnp.minimum(jnp.floor(u_top * (hf - h + 1)), hf - h)
  left = jnp.minimum(jnp.floor(u_left * (wf - w + 1)), wf - w)
  box = jnp.stack([top, left, h, w])
  # Fallback (crop_fallback.fallback_box): the whole image trimmed to the nearest allowed ratio.
  in_ratio = wf / hf
  fw = jnp.where(in_ratio > f32(ratio[1]), jnp.round(hf * f32(ratio[1])), wf)
  fh = jnp.where(in_ratio < f32(ratio[0]), jnp.round(wf / f32(ratio[0])), hf)
  fw = jnp.where(in_ratio < f32(ratio[0]), wf, fw)
  fh = jnp.where(in_ratio > f32(ratio[1]), hf, fh)
  fallback = jnp.stack([jnp.floor((hf - fh) / 2), jnp.floor((wf - fw) / 2), fh, fw])
  return jnp.where(valid.any(), box, fallback)


def _resample_matrix(start: jax.Array, length: jax.Array, size: int, extent: jax.Array,
                     canvas: int, dtype) -> jax.Array:
  """[size, canvas]: PIL's antialiased bilinear weights of [start, start + length) -> size samples.

  Pillow's `resize(box=...)` (and so the host crops and torchvision's PIL
  path): output o is centred on input coordinate c = start + (o + 0.5) s,
  s = length / size, and weighs input pixel j by the triangle
  max(0, 1 - |j + 0.5 - c| / max(s, 1)) over the pixels of the IMAGE (j <
  `extent`, its true size, not the canvas: the padding never enters),
  normalised to sum 1. Pixels just outside the box count as PIL counts them.
  Computed in `dtype` (the image's: float64 in a float64 run).
  """
  start, length = start.astype(dtype), length.astype(dtype)
  scale = length / size
  support = jnp.maximum(scale, 1.0)
  centre = start + (jnp.arange(size, dtype=dtype) + 0.5) * scale
  j = jnp.arange(canvas, dtype=dtype) + 0.5
  weights = jnp.maximum(0.0, 1.0 - jnp.abs(j[None, :] - centre[:, None]) / support)
  weights = jnp.where(jnp.arange(canvas)[None, :] < extent, weights, 0.0)
  return weights / jnp.sum(weights, axis=1, keepdims=True)


def canvas_resized_crop(canvas: jax.Array, box: jax.Array, height: jax.Array, width: jax.Array,
                        size: int) -> jax.Array:
  """`resized_crop` of the image in the top-left (height, width) of a padded canvas [C, C, 3].

  Two resampling matmuls (rows, then columns) with weights built from the
  traced box and true size: no dynamic shapes, and the canvas padding gets
  weight 0. HIGHEST precision: on GPUs a float32 matmul otherwise runs in
  TF32 (10-bit mantissa, ~1/4 of a uint8 level of error).
  """
  top, left, h, w = box[0], box[1], box[2], box[3]
  rows = _resample_matrix(top, h, size, height, canvas.shape[0], canvas.dtype)
  cols = _resample_matrix(left, w, size, width, canvas.shape[1], canvas.dtype)
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum('oh,hwc->owc', rows, canvas, precision=hi)
  return jnp.einsum('pw,owc->opc', cols, x, precision=hi)


def _lerp_axis(image: jax.Array, start: jax.Array, length: jax.Array, size: int,
               axis: int) -> jax.Array:
  """Bilinear resampling of [start, start + length) along `axis` to `size` samples.

  Output pixel o samples input coordinate start + (o + 0.5) * length / size
  - 0.5 (pixel centres aligned, as PIL/torchvision), clamped to the image, and
  blends its two neighbours: two row (or column) gathers and one lerp.
  """
  n = image.shape[axis]
  coord = start + (jnp.arange(size, dtype=jnp.float32) + 0.5) * (length / size) - 0.5
  coord = jnp.clip(coord, 0.0, n - 1.0)
  low = jnp.floor(coord)
  frac = coord - low
  low = low.astype(jnp.int32)
  high = jnp.minimum(low + 1, n - 1)
  shape = [1, 1, 1]
  shape[axis] = size
  frac = frac.reshape(shape)
  return (jnp.take(image, low, axis=axis) * (1.0 - frac)
          + jnp.take(image, high, axis=axis) * frac)


def resized_crop(image: jax.Array, box: jax.Array, size: int) -> jax.Array:
  """Crops `box` (top, left, h, w) from [H, W, C] and resizes it to [size, size, C].

  When the image is no larger than the output (cache_size <= image_size),
  every crop is upsampled, where bilinear needs no antialiasing: two
  separable gather+lerp passes, much cheaper than a resampling matmul
  (docs/benchmarks.md, "Numbers behind design choices").
  Otherwise `scale_and_translate` takes the box as traced numbers (no dynamic
  shapes) and, with antialias=True, filters when shrinking like PIL. Both
  sample the real pixels just outside the box at its border (no edge
  clamping at the box), a sub-pixel difference from crop-then-resize.
  """
  top, left, h, w = box[0], box[1], box[2], box[3]
  if image.shape[0] <= size and image.shape[1] <= size:
    x = _lerp_axis(image, top, h, size, axis=0)
    return _lerp_axis(x, left, w, size, axis=1)
  scale = jnp.stack([size / h, size / w])
  translation = -jnp.stack([top, left]) * scale
  return jax.image.scale_and_translate(image, (size, size, image.shape[-1]), (0, 1), scale,
                                       translation, method='linear', antialias=True)


def resize(image: jax.Array, size: int) -> jax.Array:
  """Resizes a square [S, S, C] image to [size, size, C] (antialiased bilinear)."""
  if image.shape[0] == size and image.shape[1] == size:
    return image
  return jax.image.resize(image, (size, size, image.shape[-1]), 'linear', antialias=True)


def hflip(image: jax.Array) -> jax.Array:
  """Mirrors [H, W, C] left-right."""
  return image[:, ::-1]


# --------------------------------------------------------------------------
# Colour (torchvision tensor semantics; images are float in [0, 1]).


def grayscale(image: jax.Array) -> jax.Array:
  """Luma [H, W, 1] of an RGB image (torchvision's rgb_to_grayscale weights).

  A dot, not a sum of channel slices: on XLA:CPU the slices of the 3-long
  last axis made the whole view slower, as did a planar [3, H, W] layout for
  all colour ops (docs/benchmarks.md, "Numbers behind design choices").
  """
  return image @ jnp.asarray(_LUMA, image.dtype)[:, None]


def solarize(image: jax.Array, threshold: float = 128 / 255) -> jax.Array:
  """Pixels >= threshold inverted (1 - x): torchvision's solarize on float images.

  BYOL's / MoCo v3's `ImageOps.solarize(x)` inverts uint8 pixels >= 128; on
  float images in [0, 1] that threshold is 128 / 255.
  """
  return jnp.where(image >= threshold, 1.0 - image, image)


def _blend(image: jax.Array, other: jax.Array, factor: jax.Array) -> jax.Array:
  """torchvision's _blend: factor * image + (1 - factor) * other, clamped to [0, 1]."""
  return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(image, factor):
  """Scales intensities; factor 0 gives black, 1 the original."""
  return _blend(image, jnp.zeros_like(image), factor)


def adjust_contrast(image, factor):
  """Blends with the image's mean luma (one scalar per image)."""
  return _blend(image, jnp.mean(grayscale(image)), factor)


def adjust_saturation(image, factor):
  """Blends with the per-pixel luma; factor 0 gives a gray image."""
  return _blend(image, grayscale(image), factor)


def _rgb_to_hsv(image: jax.Array) -> jax.Array:
  """torchvision's _rgb2hsv on [..., 3]; hue in [0, 1). A reference for tests."""
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  maxc = jnp.max(image, axis=-1)
  minc = jnp.min(image, axis=-1)
  eqc = maxc == minc
  cr = maxc - minc
  ones = jnp.ones_like(maxc)
  s = cr / jnp.where(eqc, ones, maxc)
  cr_divisor = jnp.where(eqc, ones, cr)
  rc = (maxc - r) / cr_divisor
  gc = (maxc - g) / cr_divisor
  bc = (maxc - b) / cr_divisor
  hr = jnp.where(maxc == r, bc - gc, 0.0)
  hg = jnp.where((maxc == g) & (maxc != r), 2.0 + rc - bc, 0.0)
  hb = jnp.where((maxc != g) & (maxc != r), 4.0 + gc - rc, 0.0)
  h = jnp.mod((hr + hg + hb) / 6.0 + 1.0, 1.0)
  return jnp.stack([h, s, maxc], axis=-1)


def _hsv_to_rgb(hsv: jax.Array) -> jax.Array:
  """HSV [..., 3] to RGB, equal to torchvision's _hsv2rgb up to float rounding.

  Uses the closed form c_n = v - v s clip(min(k, 4 - k), 0, 1) with
  k = (n + 6h) mod 6, n = 5, 3, 1 for r, g, b, instead of selecting among six
  (v, q, p, t) stacks. A reference for tests; `adjust_hue` fuses the round trip.
  """
  h, s, v = hsv[..., 0:1], hsv[..., 1:2], hsv[..., 2:3]
  n = jnp.asarray([5.0, 3.0, 1.0], hsv.dtype)
  k = jnp.mod(n + 6.0 * h, 6.0)
  return v - v * s * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def adjust_hue(image, shift):
  """Rotates hue by `shift` turns (in [-0.5, 0.5]); saturation and value are kept.

  torchvision's rgb -> hsv -> rgb round trip fused into one pass: with
  v = max, c = max - min and the hue h6 in sixths of a turn, channel n
  (5, 3, 1 for r, g, b) is v - c clip(min(k, 4 - k), 0, 1), k = (n + h6) mod 6.
  It never forms s = c / v, and needs one reciprocal instead of four
  divisions, which halves its cost on CPU.
  """
  r, g, b = image[..., 0:1], image[..., 1:2], image[..., 2:3]
  maxc = jnp.max(image, axis=-1, keepdims=True)
  chroma = maxc - jnp.min(image, axis=-1, keepdims=True)
  inv = 1.0 / jnp.where(chroma == 0, 1.0, chroma)
  rc, gc, bc = (maxc - r) * inv, (maxc - g) * inv, (maxc - b) * inv
  h6 = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
  n = jnp.asarray([5.0, 3.0, 1.0], image.dtype)
  k = n + h6 + 6.0 * shift
  k = k - 6.0 * jnp.floor(k * (1.0 / 6.0))  # mod 6; jnp.mod is a scalar libm call on CPU.
  return maxc - chroma * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def jitter_factors_from_uniforms(u: jax.Array, strength) -> jax.Array:
  """Brightness/contrast/saturation ~ U(max(0, 1 - x), 1 + x); hue ~ U(-h, h)."""
  bright, contrast, sat, hue = (float(x) for x in strength)
  lo = jnp.array([max(0.0, 1 - bright), max(0.0, 1 - contrast), max(0.0, 1 - sat), -hue])
  hi = jnp.array([1 + bright, 1 + contrast, 1 + sat, hue])
  return lo + (hi - lo) * u


def color_jitter(image: jax.Array, factors: jax.Array, order: jax.Array,
                 with_hue: bool = True) -> jax.Array:
  """Applies brightness, contrast, saturation and hue in the order `order`.

  torchvision applies the four ops in a random permutation. Evaluating all
  four ops at each of four positions under vmap would cost 16 ops; instead,
  the three blends (which differ only in what they blend with: 0, the mean
  luma, the pixel luma) run as one masked "blend slot" per position (factor
  1 = identity), once before the hue op and once after it. That is 6 cheap
  blends and 1 hue rotation, and equals the permuted sequence exactly.

  Args:
    image: float [H, W, 3] in [0, 1].
    factors: [4] brightness, contrast, saturation factors and hue shift.
    order: int [4], a permutation of 0..3 (0 b, 1 c, 2 s, 3 h).
    with_hue: statically skip the hue op (hue strength 0).
  """
  hue_pos = jnp.argmax(order == 3)

  def blends(x, before_hue):
    # Blends before the hue op sit at positions 0-2, those after it at 1-3.
    for pos in (range(3) if before_hue else range(1, 4)):
      op = order[pos]
      active = (op != 3) & ((pos < hue_pos) if before_hue else (pos > hue_pos))
      factor = jnp.where(active, factors[jnp.minimum(op, 2)], 1.0)
      luma = grayscale(x)
      other = jnp.where(op == 0, 0.0, jnp.where(op == 1, jnp.mean(luma), luma))
      x = jnp.where(active, _blend(x, other, factor), x)
    return x

  x = blends(image, before_hue=True)
  if with_hue:
    x = adjust_hue(x, factors[3])
  return blends(x, before_hue=False)


# --------------------------------------------------------------------------
# Blur.


def blur_kernel_size(image_size: int) -> int:
  """Odd kernel ~10% of the image side (SimCLR/MoCo: 23 at 224 px), at least 3."""
  k = max(3, int(0.1 * image_size))
  return k if k % 2 else k + 1


def _gaussian_kernel(sigma: jax.Array, size: int) -> jax.Array:
  """torchvision's 1-D Gaussian kernel of odd `size`, normalised to sum 1."""
  half = (size - 1) / 2
  x = jnp.linspace(-half, half, size)
  pdf = jnp.exp(-0.5 * jnp.square(x / sigma))
  return pdf / jnp.sum(pdf)


def _reflect(i: int, n: int) -> int:
  """Index i reflected into [0, n) without repeating the edge (torch 'reflect')."""
  while i < 0 or i >= n:
    i = -i if i < 0 else 2 * (n - 1) - i
  return i


def _blur_matrix(weights: jax.Array, n: int) -> jax.Array:
  """[n, n] matrix applying a 1-D kernel with reflect padding along one axis.

  Row i holds the kernel taps at the reflected positions i - k//2 .. i + k//2.
  The tap-to-column map is a static one-hot table, so the per-example kernel
  (random sigma) only enters through one small contraction.
  """
  size = weights.shape[0]
  half = size // 2
  table = [[_reflect(i + t - half, n) for t in range(size)] for i in range(n)]
  onehot = jax.nn.one_hot(jnp.asarray(table), n, dtype=weights.dtype)  # [n, k, n]
  return jnp.einsum('t,itj->ij', weights, onehot)


def gaussian_blur(image: jax.Array, sigma: jax.Array, kernel_size: int) -> jax.Array:
  """Separable Gaussian blur of [H, W, C] with reflect padding (torchvision's).

  The kernel differs per example (sigma is random), which rules out one
  shared convolution; as two small matmuls (rows, then columns) the blur runs
  on the MXU/tensor cores and is several times faster than shifted sums on CPU.
  """
  weights = _gaussian_kernel(sigma, kernel_size)
  rows = _blur_matrix(weights, image.shape[0])
  cols = rows if image.shape[1] == image.shape[0] else _blur_matrix(weights, image.shape[1])
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum('ij,jwc->iwc', rows, image, precision=hi)
  return jnp.einsum('wj,ijc->iwc', cols, x, precision=hi)


def normalize(image: jax.Array, aug_config) -> jax.Array:
  """(x - mean) / std per channel, as torchvision's Normalize after ToTensor."""
  mean = jnp.asarray(aug_config.mean, jnp.float32)
  std = jnp.asarray(aug_config.std, jnp.float32)
  return (image - mean) / std
