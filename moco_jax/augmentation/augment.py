"""MoCo v2 augmentations on the accelerator, in JAX, one example at a time.

Two random views of each image are made inside the jit-compiled train step
instead of on the host, because a 2-core host cannot run torchvision-style
augmentation fast enough to feed a GPU. Each op (`moco_jax.augmentation.image_ops`) works on one float image
[H, W, 3] in [0, 1] and is vmapped over the batch; a per-example random choice
(jitter on/off, blur on/off, ...) is a `jnp.where`, so every example runs the
same program and XLA sees static shapes.

Per-example randomness comes only from `_example_keys(rng, example_ids)`: keys
folded from each example's global index. A batch split 1, 2 or 8 ways across
devices therefore gets identical views.

Streamed data (`moco_jax.data.streaming`) arrives either as each image in a
padded canvas with its true size (`data.stream_crops='device'`):
`two_views_from_canvas` draws both boxes over the true size and crops here; or
as both views' crops, cut on the host from the whole original image
(`data.stream_crops='host'`): `two_views_from_crops` then runs everything but
the crop, from the same per-example uniforms.

The pipeline (`config.aug`) follows MoCo v2's "aug+" (torchvision):
  RandomResizedCrop(scale, ratio) -> RandomApply(ColorJitter(b, c, s, h), p)
  -> RandomGrayscale(p) -> RandomApply(GaussianBlur(sigma), p)
  -> RandomHorizontalFlip -> ToTensor -> Normalize(mean, std).
MoCo v1's set is the same with jitter_prob=1, blur_prob=0, jitter 0.4 x 4.
Colour ops follow torchvision's tensor formulas (`torchvision.transforms.v2.
functional`), including the random order of the four jitter ops.

Images with C != 3 channels (`data.channels`: grayscale, RGBA, multispectral)
get the same crop, blur, flip and normalisation (per channel); colour jitter
becomes per-channel brightness and contrast jitter (`channel_jitter`) and
grayscale is skipped: hue, saturation and luma are RGB notions.

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

import jax
import jax.numpy as jnp

from moco_jax.augmentation import image_ops

# Uniforms one view consumes: crop, 4 jitter factors, jitter order (4),
# jitter on, grayscale on, blur sigma, blur on, flip.
_VIEW_UNIFORMS = image_ops.CROP_UNIFORMS + 4 + 4 + 5


def _example_keys(rng: jax.Array, example_ids: jax.Array) -> jax.Array:
  """One independent key per example, derived from its global index."""
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(example_ids)


def _view_uniforms(aug_config) -> int:
  """How many uniforms one view draws (solarize adds one, only when some view uses it)."""
  return _VIEW_UNIFORMS + (1 if max(view_probs(aug_config, 'solarize')) > 0 else 0)


def view_probs(aug_config, name: str) -> tuple:
  """(first view's, second view's) probability of `name` ('blur' | 'solarize').

  `aug.second_view_<name>_prob` -1 means the same as the first view's: MoCo v2
  is symmetric; MoCo v3 (BYOL's recipe) blurs view 1 always and view 2 with
  p 0.1, and solarizes view 2 only (p 0.2).
  """
  first = float(aug_config.get(f'{name}_prob', 0.0))
  second = float(aug_config.get(f'second_view_{name}_prob', -1.0))
  return first, (first if second < 0 else second)


def random_view(key: jax.Array, image: jax.Array, aug_config, image_size: int,
                crop: bool = True, second_view=False, dtype=jnp.float32,
                true_size=None) -> jax.Array:
  """One MoCo view of one uint8 image [S, S, 3]: `dtype` [size, size, 3], normalised.

  All of a view's random numbers come from one `uniform` draw: each
  jax.random call inlines a threefry hash, and a dozen of them per view made
  compiling the train step several times slower. With `crop=False` the image
  is the view's RandomResizedCrop, already cut on the host (streaming input,
  [size, size, 3]): the same draw is made and its crop uniforms go unused, so
  jitter, grayscale, blur and flip use the uniforms of the device-crop path.
  `second_view` (a traced bool) picks the second view's blur and solarize
  probabilities (`view_probs`). Solarize draws one more uniform, only when
  some view uses it, so configs without it draw exactly what they drew before.
  `dtype` is float32, or float64 in a float64 run: then no float32 rounding
  (whose last bit XLA may round differently for another batch size) enters.
  `true_size` (traced int32 [2], or None): `image` is a padded canvas
  [C, C, 3] holding an image of this (height, width) in its top-left corner
  (streamed input, `two_views_from_canvas`); the box is drawn over the true
  size from the same uniforms and the padding never enters the crop.
  """
  blur_probs, solarize_probs = view_probs(aug_config, 'blur'), view_probs(aug_config, 'solarize')
  solarize = max(solarize_probs) > 0
  u = jax.random.uniform(key, (_view_uniforms(aug_config),))
  u_crop, u = u[:image_ops.CROP_UNIFORMS], u[image_ops.CROP_UNIFORMS:]
  u_factors, u_order = u[0:4], u[4:8]
  u_jitter, u_gray, u_sigma, u_blur, u_flip = u[8], u[9], u[10], u[11], u[12]

  x = image.astype(dtype) / 255.0
  if true_size is not None:
    height, width = true_size[0], true_size[1]
    box = image_ops.crop_box_in(u_crop, height, width, tuple(aug_config.crop_scale),
                                tuple(aug_config.crop_ratio))
    x = jnp.clip(image_ops.canvas_resized_crop(x, box, height, width, image_size), 0.0, 1.0)
  elif crop:
    box = image_ops.crop_box_from_uniforms(u_crop, x.shape[0], x.shape[1],
                                           tuple(aug_config.crop_scale),
                                           tuple(aug_config.crop_ratio))
    x = jnp.clip(image_ops.resized_crop(x, box, image_size), 0.0, 1.0)

  strength = tuple(float(v) for v in aug_config.jitter)
  if x.shape[-1] != 3:  # Not RGB (data.channels): no hue, saturation or grayscale.
    if aug_config.jitter_prob > 0 and any(strength[:2]):
      jittered = channel_jitter(jax.random.fold_in(key, 1), x, strength[0], strength[1])
      x = jnp.where(u_jitter < aug_config.jitter_prob, jittered, x)
  elif aug_config.jitter_prob > 0 and any(strength):
    factors = image_ops.jitter_factors_from_uniforms(u_factors, strength)
    order = jnp.argsort(u_order)  # A uniformly random permutation of the 4 ops.
    jittered = image_ops.color_jitter(x, factors, order, with_hue=strength[3] > 0)
    x = jnp.where(u_jitter < aug_config.jitter_prob, jittered, x)

  if aug_config.grayscale_prob > 0 and x.shape[-1] == 3:
    gray = jnp.broadcast_to(image_ops.grayscale(x), x.shape)
    x = jnp.where(u_gray < aug_config.grayscale_prob, gray, x)

  if max(blur_probs) > 0:
    lo, hi = aug_config.blur_sigma
    sigma = lo + (hi - lo) * u_sigma
    blurred = image_ops.gaussian_blur(x, sigma, image_ops.blur_kernel_size(image_size))
    x = jnp.where(u_blur < jnp.where(second_view, blur_probs[1], blur_probs[0]), blurred, x)

  if solarize:
    u_solarize = u[_VIEW_UNIFORMS - image_ops.CROP_UNIFORMS]
    x = jnp.where(u_solarize < jnp.where(second_view, solarize_probs[1], solarize_probs[0]),
                  image_ops.solarize(x), x)

  if aug_config.flip:
    x = jnp.where(u_flip < 0.5, image_ops.hflip(x), x)
  return image_ops.normalize(x, aug_config)


def channel_jitter(key: jax.Array, x: jax.Array, brightness: float, contrast: float) -> jax.Array:
  """Per-channel brightness then contrast jitter of [H, W, C] in [0, 1] (C != 3).

  Each channel gets its own factors b_c ~ U[max(0, 1 - brightness), 1 + brightness]
  and c_c ~ U[max(0, 1 - contrast), 1 + contrast] (torchvision's ranges):
  x_c <- clip(b_c x_c), then x_c <- clip(c_c x_c + (1 - c_c) mean(x_c)), the
  RGB formulas with each channel its own luma. Its uniforms come from a key of
  their own, so the RGB path draws exactly what it drew before.
  """
  u = jax.random.uniform(key, (2, x.shape[-1]), x.dtype)
  b_lo, c_lo = max(0.0, 1.0 - brightness), max(0.0, 1.0 - contrast)
  b = b_lo + (1.0 + brightness - b_lo) * u[0]
  c = c_lo + (1.0 + contrast - c_lo) * u[1]
  x = jnp.clip(x * b, 0.0, 1.0)
  mean = jnp.mean(x, axis=(0, 1))
  return jnp.clip(c * x + (1.0 - c) * mean, 0.0, 1.0)


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
  # Both views in one vmap over 2B examples: one copy of the program to
  # compile (half the compile time) and twice the work per kernel launch.
  compute = jnp.promote_types(dtype, jnp.float32)  # float32, or float64 in a float64 run.
  views = jax.vmap(lambda k, im, second: random_view(k, im, aug_config, image_size,
                                                     second_view=second, dtype=compute))(
      _view_keys(rng, example_ids), jnp.concatenate([images, images]), _second_view(batch))
  views = views.astype(dtype)
  return views[:batch], views[batch:]


def _second_view(batch: int) -> jax.Array:
  """bool [2B]: False for the query views (first B), True for the key views."""
  return jnp.arange(2 * batch) >= batch


def _view_keys(rng, example_ids):
  """Keys [2B]: the query views' (first B), then the key views' (last B)."""
  keys = _example_keys(rng, example_ids)
  keys = jax.vmap(lambda k: jax.random.split(k, 2))(keys)  # [B, 2]
  return jnp.concatenate([keys[:, 0], keys[:, 1]])


def two_views_from_crops(rng, crops, example_ids, aug_config, image_size, dtype=jnp.float32):
  """`two_views` of crops cut on the host (streaming input): the same keys, no device crop.

  Args:
    rng: the step's augmentation key (the same on every device).
    crops: uint8 [B, 2, image_size, image_size, 3]: each example's query and
      key RandomResizedCrop (`moco_jax.data.host_crops.two_crops`).
    example_ids: int32 [B] global positions of these examples in the global batch.
    aug_config, image_size, dtype: as `two_views`.

  Returns:
    (query_view, key_view), each [B, image_size, image_size, 3] in `dtype`:
    jitter, grayscale, blur, flip and normalisation drawn from the same
    per-example uniforms as `two_views` draws them.
  """
  batch = crops.shape[0]
  compute = jnp.promote_types(dtype, jnp.float32)  # float32, or float64 in a float64 run.
  views = jax.vmap(lambda k, im, second: random_view(k, im, aug_config, image_size, crop=False,
                                                     second_view=second, dtype=compute))(
      _view_keys(rng, example_ids), jnp.concatenate([crops[:, 0], crops[:, 1]]),
      _second_view(batch))
  views = views.astype(dtype)
  return views[:batch], views[batch:]


def two_views_from_canvas(rng, canvases, sizes, example_ids, aug_config, image_size,
                          dtype=jnp.float32):
  """`two_views` of images in padded canvases (streaming input): crops made here, from the same keys.

  Args:
    rng: the step's augmentation key (the same on every device).
    canvases: uint8 [B, C, C, 3]: each example's decoded image in the top-left
      corner of a C x C canvas (`moco_jax.data.canvas_loader`).
    sizes: int32 [B, 2]: each image's true (height, width) in its canvas.
    example_ids: int32 [B] global positions of these examples in the global batch.
    aug_config, image_size, dtype: as `two_views`.

  Returns:
    (query_view, key_view), each [B, image_size, image_size, 3] in `dtype`:
    RandomResizedCrop boxes drawn over each true size (`image_ops.crop_box_in`)
    from the same per-example uniforms as `two_views`, resized as Pillow does
    (`image_ops.canvas_resized_crop`), then the same colour ops.
  """
  batch = canvases.shape[0]
  compute = jnp.promote_types(dtype, jnp.float32)  # float32, or float64 in a float64 run.
  sizes = jnp.asarray(sizes, jnp.int32)
  views = jax.vmap(lambda k, im, hw, second: random_view(k, im, aug_config, image_size,
                                                         second_view=second, dtype=compute,
                                                         true_size=hw))(
      _view_keys(rng, example_ids), jnp.concatenate([canvases, canvases]),
      jnp.concatenate([sizes, sizes]), _second_view(batch))
  views = views.astype(dtype)
  return views[:batch], views[batch:]


def crop_boxes_from_canvas(rng, sizes, example_ids, aug_config):
  """float32 [2, B, 4]: the (top, left, h, w) boxes `two_views_from_canvas` cuts (query, key).

  The same keys and uniforms as the views (tests compare them with the host's
  `crop_box`, the law of the host-crop path).
  """
  batch = sizes.shape[0]
  sizes = jnp.asarray(sizes, jnp.int32)

  def box(key, hw):
    u = jax.random.uniform(key, (_view_uniforms(aug_config),))[:image_ops.CROP_UNIFORMS]
    return image_ops.crop_box_in(u, hw[0], hw[1], tuple(aug_config.crop_scale),
                                 tuple(aug_config.crop_ratio))

  boxes = jax.vmap(box)(_view_keys(rng, example_ids), jnp.concatenate([sizes, sizes]))
  return boxes.reshape(2, batch, 4)


def eval_view(images, image_size, aug_config, dtype=jnp.float32):
  """Deterministic view for evaluation: resize [B, S, S, 3] uint8 to image_size, normalise.

  The cached images are already centre squares (the host's resize + centre
  crop), so this is torchvision's Resize + CenterCrop + ToTensor + Normalize.
  """
  x = images.astype(jnp.float32) / 255.0
  x = jax.vmap(lambda im: jnp.clip(image_ops.resize(im, image_size), 0.0, 1.0))(x)
  return image_ops.normalize(x, aug_config).astype(dtype)
