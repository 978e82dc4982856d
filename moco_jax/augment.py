"""MoCo v2 augmentations on the accelerator, in JAX, one example at a time.

Two random views of each image are made inside the jit-compiled train step
instead of on the host, because a 2-core host cannot run torchvision-style
augmentation fast enough to feed a GPU. Each op (`moco_jax.image_ops`) works on one float image
[H, W, 3] in [0, 1] and is vmapped over the batch; a per-example random choice
(jitter on/off, blur on/off, ...) is a `jnp.where`, so every example runs the
same program and XLA sees static shapes.

Per-example randomness comes only from `_example_keys(rng, example_ids)`: keys
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

import jax
import jax.numpy as jnp

from moco_jax import image_ops

# Uniforms one view consumes: crop, 4 jitter factors, jitter order (4),
# jitter on, grayscale on, blur sigma, blur on, flip.
_VIEW_UNIFORMS = image_ops.CROP_UNIFORMS + 4 + 4 + 5


def _example_keys(rng: jax.Array, example_ids: jax.Array) -> jax.Array:
  """One independent key per example, derived from its global index."""
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(example_ids)


def random_view(key: jax.Array, image: jax.Array, aug_config, image_size: int) -> jax.Array:
  """One MoCo view of one uint8 image [S, S, 3]: float32 [size, size, 3], normalised.

  All of a view's random numbers come from one `uniform` draw: each
  jax.random call inlines a threefry hash, and a dozen of them per view made
  compiling the train step several times slower.
  """
  u = jax.random.uniform(key, (_VIEW_UNIFORMS,))
  u_crop, u = u[:image_ops.CROP_UNIFORMS], u[image_ops.CROP_UNIFORMS:]
  u_factors, u_order = u[0:4], u[4:8]
  u_jitter, u_gray, u_sigma, u_blur, u_flip = u[8], u[9], u[10], u[11], u[12]

  x = image.astype(jnp.float32) / 255.0
  box = image_ops.crop_box_from_uniforms(u_crop, x.shape[0], x.shape[1],
                                         tuple(aug_config.crop_scale), tuple(aug_config.crop_ratio))
  x = jnp.clip(image_ops.resized_crop(x, box, image_size), 0.0, 1.0)

  strength = tuple(float(v) for v in aug_config.jitter)
  if aug_config.jitter_prob > 0 and any(strength):
    factors = image_ops.jitter_factors_from_uniforms(u_factors, strength)
    order = jnp.argsort(u_order)  # A uniformly random permutation of the 4 ops.
    jittered = image_ops.color_jitter(x, factors, order, with_hue=strength[3] > 0)
    x = jnp.where(u_jitter < aug_config.jitter_prob, jittered, x)

  if aug_config.grayscale_prob > 0:
    gray = jnp.broadcast_to(image_ops.grayscale(x), x.shape)
    x = jnp.where(u_gray < aug_config.grayscale_prob, gray, x)

  if aug_config.blur_prob > 0:
    lo, hi = aug_config.blur_sigma
    sigma = lo + (hi - lo) * u_sigma
    blurred = image_ops.gaussian_blur(x, sigma, image_ops.blur_kernel_size(image_size))
    x = jnp.where(u_blur < aug_config.blur_prob, blurred, x)

  if aug_config.flip:
    x = jnp.where(u_flip < 0.5, image_ops.hflip(x), x)
  return image_ops.normalize(x, aug_config)


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
  keys = _example_keys(rng, example_ids)
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
  x = jax.vmap(lambda im: jnp.clip(image_ops.resize(im, image_size), 0.0, 1.0))(x)
  return image_ops.normalize(x, aug_config).astype(dtype)
