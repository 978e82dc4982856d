"""`aug.mean='auto'` / `aug.std='auto'`: per-channel statistics of the train split, once.

ImageNet's mean and std fit RGB photos; a grayscale scan or a 13-band
satellite tile needs its own, one value per channel. 'auto' computes them from
a fixed sample of the train split (`SAMPLE` images drawn with seed 0, all if
fewer; the decoded S x S squares the eval view also starts from, as [0, 1]
values) before the run starts, and the run's config.json records the numbers,
so every later mode (and a resume) uses the same ones without recomputing.
"""

from absl import logging
import numpy as np

from moco_jax.core import errors
from moco_jax.data import eval_reader
from moco_jax.data import sources
from moco_jax.data import streaming
from moco_jax.data.dataset import Source

SAMPLE = 1000
# std below this (a constant channel) would divide by ~0: it is raised to it.
MIN_STD = 1e-3


def is_auto(value) -> bool:
  """'auto', or ('auto',) as `--config.aug.mean=auto` parses into the tuple field."""
  if isinstance(value, (tuple, list)) and len(value) == 1:
    value = value[0]
  return isinstance(value, str) and value == 'auto'


def channel_stats(images: np.ndarray) -> tuple[list, list]:
  """(mean, std) per channel of uint8 [N, S, S, C] as [0, 1] values, in float64."""
  x = np.asarray(images, np.float64) / 255.0
  mean = x.mean(axis=(0, 1, 2))
  std = np.maximum(x.std(axis=(0, 1, 2)), MIN_STD)
  return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


def sample_images(data: Source) -> np.ndarray:
  """uint8 [n, S, S, C]: the fixed sample (seed 0) of the train split."""
  train = streaming.open_split(data, 'train', evaluation=True, log=False)
  if train.stream:
    indices = eval_reader.subset_indices(len(train.data), SAMPLE)
    return eval_reader.decode_subset(train.data, indices, data.spec.side,
                                     data.spec.num_workers).images
  images = train.data.images
  return images[eval_reader.subset_indices(len(images), SAMPLE)]


def resolve(config) -> None:
  """Replaces 'auto' in config.aug.mean / std by the train split's numbers (in place)."""
  mean, std = config.aug.mean, config.aug.std
  if not (is_auto(mean) or is_auto(std)):
    return
  images = sample_images(sources.from_config(config))
  if not len(images):
    raise errors.DataError('aug.mean / aug.std = auto: the train split has no readable image.')
  auto_mean, auto_std = channel_stats(images)
  with config.ignore_type():
    if is_auto(mean):
      config.aug.mean = tuple(auto_mean)
    if is_auto(std):
      config.aug.std = tuple(auto_std)
  logging.info('aug.mean = %s, aug.std = %s: computed from %d train images (seed 0); recorded '
               'in config.json.', list(config.aug.mean), list(config.aug.std), len(images))
