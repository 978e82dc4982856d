"""The pure pieces of the paper's linear protocol (`linear_paper.py`): schedule, SGD, views.

As the official main_lincls.py: lr x batch / 256 stepped x0.1 at whole epochs
(adjust_learning_rate), torch's SGD momentum, RandomResizedCrop + flip train
views drawn from (seed, epoch, index), and the Resize + CenterCrop val view.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moco_jax.augmentation import image_ops
from moco_jax.data.dataset import ImageDataset

MOMENTUM = 0.9  # main_lincls.py's default.
_VIEW_TAG = 0x6C696E  # 'lin': keeps these views' keys apart from pretraining's.


# --------------------------------------------------------------------------
# The schedule and the optimiser (pure functions).


def base_lr(eval_config, batch: int) -> float:
  """eval.linear_lr x batch / 256 (30 at the paper's batch of 256)."""
  return float(eval_config.linear_lr) * batch / 256


def epoch_lr(lr: float, epoch: int, milestones) -> float:
  """The official adjust_learning_rate: lr x 0.1 for each milestone epoch <= `epoch` (0-based)."""
  for milestone in milestones:
    lr *= 0.1 if epoch >= milestone else 1.0
  return lr


def sgd_momentum(params, buf, grads, lr, weight_decay: float, momentum: float = MOMENTUM):
  """torch.optim.SGD (dampening 0, no Nesterov): g += wd w; buf = m buf + g; w -= lr buf.

  A zero initial buffer gives torch's first step (buf = g) exactly.
  """
  grads = jax.tree.map(lambda g, w: g + weight_decay * w, grads, params)
  buf = jax.tree.map(lambda b, g: momentum * b + g, buf, grads)
  params = jax.tree.map(lambda w, b: w - lr * b, params, buf)
  return params, buf


# --------------------------------------------------------------------------
# Views.


class Norm(NamedTuple):
  """What `image_ops.normalize` reads (hashable, for the compile cache)."""
  mean: tuple
  std: tuple


def view_key(seed: int, epoch, index) -> jax.Array:
  """The key of example `index`'s train view in `epoch`: a pure function of the three."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), _VIEW_TAG)
  return jax.random.fold_in(jax.random.fold_in(key, epoch), index)


def train_view(key: jax.Array, image: jax.Array, image_size: int, scale, ratio,
               norm, crop: bool = True) -> jax.Array:
  """RandomResizedCrop + RandomHorizontalFlip + Normalize of one uint8 [H, W, 3] image.

  With `crop=False` the image is the crop already cut on the host (streamed
  input, `host_crops.linear_uniforms`): only the flip and Normalize remain.
  """
  u = jax.random.uniform(key, (image_ops.CROP_UNIFORMS + 1,))
  x = image.astype(jnp.float32) / 255.0
  if crop:
    box = image_ops.crop_box_from_uniforms(u[:-1], x.shape[0], x.shape[1], scale, ratio)
    x = jnp.clip(image_ops.resized_crop(x, box, image_size), 0.0, 1.0)
  x = jnp.where(u[-1] < 0.5, image_ops.hflip(x), x)
  return image_ops.normalize(x, norm)


def center_crop_split(ds: ImageDataset, fraction: float) -> ImageDataset:
  """The central `fraction` of each cached square (a view, no copy): Resize(S/f) + CenterCrop(S).

  The cached images are already the centre squares of the originals, so their
  central 224/256, resized to image_size, is main_lincls.py's val transform.
  """
  side = ds.images.shape[1]
  crop = max(1, int(round(side * fraction)))
  top = (side - crop) // 2
  return ImageDataset(ds.images[:, top:top + crop, top:top + crop], ds.labels, ds.num_classes,
                      ds.class_names)
