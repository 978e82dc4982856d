"""MoCo v2 augmentations on the accelerator, in JAX, one example at a time.

Two random views of each image are made inside the jit-compiled train step
instead of on the host, because a 2-core host cannot run torchvision-style
augmentation fast enough to feed a GPU. Each op below works on one float image
[H, W, 3] in [0, 1] and is vmapped over the batch; a per-example random choice
(jitter on/off, blur on/off, ...) is a `jnp.where`, so every example runs the
same program and XLA sees static shapes.

Per-example randomness comes only from `example_keys(rng, example_ids)`: keys
folded from each example's global index. A batch split 1, 2 or 8 ways across
devices therefore gets identical views.

The pipeline (`config.aug`) follows MoCo v2's "aug+" (torchvision):
  RandomResizedCrop(scale, ratio) -> RandomApply(ColorJitter(b, c, s, h), p)
  -> RandomGrayscale(p) -> RandomApply(GaussianBlur(sigma), p)
  -> RandomHorizontalFlip -> ToTensor -> Normalize(mean, std).
MoCo v1's set is the same with jitter_prob=1, blur_prob=0, jitter 0.4 x 4.
Colour ops follow torchvision's tensor formulas (`torchvision.transforms.v2.
functional`), including the random order of the four jitter ops.

Known differences from the reference (PIL) pipeline, all deliberate:
  * PIL's ColorJitter works on uint8 with its own rounding; the tensor
    formulas here work on float and clamp to [0, 1] after each op.
  * The blur kernel is ~10% of the output side (23 taps at 224 px, as
    SimCLR/torchvision's GaussianBlur); MoCo's own GaussianBlur used PIL's
    radius=sigma filter with no size limit. At sigma <= 2 both cover the
    kernel's mass except at 32 px (3 taps), where blur is usually off.
  * The crop samples the real pixels just outside its box at the border
    (crop-then-resize would repeat the box's edge): sub-pixel.
"""

import math

import jax
import jax.numpy as jnp

# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)
# Boxes tried by RandomResizedCrop before it falls back to a centre crop.
_CROP_TRIES = 10
# Uniforms a crop consumes: 10 areas, 10 log-ratios, top, left.
_CROP_UNIFORMS = 2 * _CROP_TRIES + 2
# Uniforms one view consumes: crop, 4 jitter factors, jitter order (4),
# jitter on, grayscale on, blur sigma, blur on, flip.
_VIEW_UNIFORMS = _CROP_UNIFORMS + 4 + 4 + 5


def example_keys(rng: jax.Array, example_ids: jax.Array) -> jax.Array:
  """One independent key per example, derived from its global index."""
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(example_ids)


# --------------------------------------------------------------------------
# Geometry.


def crop_box(key: jax.Array, height: int, width: int, scale=(0.08, 1.0),
             ratio=(3 / 4, 4 / 3)) -> jax.Array:
  """Samples a RandomResizedCrop box (top, left, h, w) as torchvision does.

  See `crop_box_from_uniforms`; returns float32 [4] of integers.
  """
  u = jax.random.uniform(key, (_CROP_UNIFORMS,))
  return crop_box_from_uniforms(u, height, width, scale, ratio)


def crop_box_from_uniforms(u: jax.Array, height: int, width: int, scale, ratio) -> jax.Array:
  """RandomResizedCrop's box from `_CROP_UNIFORMS` uniforms in [0, 1).

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
  in_ratio = width / height
  if in_ratio < ratio[0]:
    fw, fh = width, round(width / ratio[0])
  elif in_ratio > ratio[1]:
    fw, fh = round(height * ratio[1]), height
  else:
    fw, fh = width, height
  fallback = jnp.array([(height - fh) // 2, (width - fw) // 2, fh, fw], jnp.float32)
  box = jnp.stack([top, left, h, w]).astype(jnp.float32)
  return jnp.where(valid.any(), box, fallback)


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
  separable gather+lerp passes, about 10x cheaper than a resampling matmul.
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
  last axis made the whole view 2-3x slower (measured; so did a planar
  [3, H, W] layout for all colour ops).
  """
  return image @ jnp.asarray(_LUMA, image.dtype)[:, None]


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


def rgb_to_hsv(image: jax.Array) -> jax.Array:
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


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
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


def jitter_factors(key: jax.Array, strength) -> jax.Array:
  """Samples torchvision ColorJitter factors [b, c, s, h] from strengths (b, c, s, h)."""
  return jitter_factors_from_uniforms(jax.random.uniform(key, (4,)), strength)


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


def gaussian_kernel(sigma: jax.Array, size: int) -> jax.Array:
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


def blur_matrix(weights: jax.Array, n: int) -> jax.Array:
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
  weights = gaussian_kernel(sigma, kernel_size)
  rows = blur_matrix(weights, image.shape[0])
  cols = rows if image.shape[1] == image.shape[0] else blur_matrix(weights, image.shape[1])
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum('ij,jwc->iwc', rows, image, precision=hi)
  return jnp.einsum('wj,ijc->iwc', cols, x, precision=hi)


# --------------------------------------------------------------------------
# Views.


def normalize(image: jax.Array, aug_config) -> jax.Array:
  """(x - mean) / std per channel, as torchvision's Normalize after ToTensor."""
  mean = jnp.asarray(aug_config.mean, jnp.float32)
  std = jnp.asarray(aug_config.std, jnp.float32)
  return (image - mean) / std


def random_view(key: jax.Array, image: jax.Array, aug_config, image_size: int) -> jax.Array:
  """One MoCo view of one uint8 image [S, S, 3]: float32 [size, size, 3], normalised.

  All of a view's random numbers come from one `uniform` draw: each
  jax.random call inlines a threefry hash, and a dozen of them per view made
  compiling the train step several times slower.
  """
  u = jax.random.uniform(key, (_VIEW_UNIFORMS,))
  u_crop, u = u[:_CROP_UNIFORMS], u[_CROP_UNIFORMS:]
  u_factors, u_order = u[0:4], u[4:8]
  u_jitter, u_gray, u_sigma, u_blur, u_flip = u[8], u[9], u[10], u[11], u[12]

  x = image.astype(jnp.float32) / 255.0
  box = crop_box_from_uniforms(u_crop, x.shape[0], x.shape[1], tuple(aug_config.crop_scale),
                               tuple(aug_config.crop_ratio))
  x = jnp.clip(resized_crop(x, box, image_size), 0.0, 1.0)

  strength = tuple(float(v) for v in aug_config.jitter)
  if aug_config.jitter_prob > 0 and any(strength):
    factors = jitter_factors_from_uniforms(u_factors, strength)
    order = jnp.argsort(u_order)  # A uniformly random permutation of the 4 ops.
    jittered = color_jitter(x, factors, order, with_hue=strength[3] > 0)
    x = jnp.where(u_jitter < aug_config.jitter_prob, jittered, x)

  if aug_config.grayscale_prob > 0:
    gray = jnp.broadcast_to(grayscale(x), x.shape)
    x = jnp.where(u_gray < aug_config.grayscale_prob, gray, x)

  if aug_config.blur_prob > 0:
    lo, hi = aug_config.blur_sigma
    blurred = gaussian_blur(x, lo + (hi - lo) * u_sigma, blur_kernel_size(image_size))
    x = jnp.where(u_blur < aug_config.blur_prob, blurred, x)

  if aug_config.flip:
    x = jnp.where(u_flip < 0.5, hflip(x), x)
  return normalize(x, aug_config)


def two_views(rng, images, example_ids, aug_config, image_size, dtype=jnp.float32):
  """Returns (query_view, key_view), each [B, image_size, image_size, 3] in `dtype`.

  Args:
    rng: the step's augmentation key (the same on every device).
    images: uint8 [B, S, S, 3] decoded images of this device.
    example_ids: int32 [B] global positions of these images in the global batch.
    aug_config: the `config.aug` ConfigDict.
    image_size: output side length.
    dtype: compute dtype of the network.
  """
  batch = images.shape[0]
  keys = example_keys(rng, example_ids)
  keys = jax.vmap(lambda k: jax.random.split(k, 2))(keys)  # [B, 2]
  # Both views in one vmap over 2B examples: one copy of the program to
  # compile (half the compile time) and twice the work per kernel launch.
  keys = jnp.concatenate([keys[:, 0], keys[:, 1]])
  views = jax.vmap(lambda k, im: random_view(k, im, aug_config, image_size))(
      keys, jnp.concatenate([images, images]))
  views = views.astype(dtype)
  return views[:batch], views[batch:]


def eval_view(images, image_size, aug_config, dtype=jnp.float32):
  """Deterministic view for evaluation: resize [B, S, S, 3] uint8 to image_size, normalise.

  The cached images are already centre squares (the host's resize + centre
  crop), so this is torchvision's Resize + CenterCrop + ToTensor + Normalize.
  """
  x = images.astype(jnp.float32) / 255.0
  x = jax.vmap(lambda im: jnp.clip(resize(im, image_size), 0.0, 1.0))(x)
  return normalize(x, aug_config).astype(dtype)
