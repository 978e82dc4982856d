"""What every source returns, and the helpers they share.

`ImageDataset` is a decoded split in host memory and `StreamSource` the
random-access reader of a split (every source offers both: folder,
tfds, synthetic); `decoded_split` is the one
tail every decoding source ends with (assemble in order, drop what did not
decode, cache, wrap); the split helpers resolve config names to splits.
"""

import dataclasses
from typing import Iterable

from absl import logging
import numpy as np

from moco_jax.core import errors
from moco_jax.data import cache
from moco_jax.data import decode

# Splits tried, in order, when the configured eval split is missing:
# ImageFolder archives use val/ (Imagenette) or test/ (CIFAR-10-images).
EVAL_FALLBACKS = ('val', 'validation', 'test')


@dataclasses.dataclass
class ImageDataset:
  """A decoded split: uint8 images [N, S, S, 3] and int32 labels [N]."""
  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  class_names: list

  def __len__(self) -> int:
    return int(self.images.shape[0])


def image_side(data_config) -> int:
  """The square side S images are decoded to (and cached at).

  `data.cache_size` when set (> 0), else round(image_size x data.cache_ratio):
  the decoded size follows image_size unless it is pinned.
  """
  cache_size = int(data_config.get('cache_size', -1))
  if cache_size > 0:
    return cache_size
  return int(round(int(data_config.image_size) * float(data_config.get('cache_ratio', 1.0))))


def split_field(split: str) -> str:
  """The config field naming the split: 'train' -> train_split, 'eval' -> eval_split."""
  if split not in ('train', 'eval'):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}.")
  return f'{split}_split'


def pick_split(wanted: str, available: Iterable[str], field: str, where: str,
               allow_fallback: bool) -> str:
  """Returns `wanted` if available, else (eval only) the first present fallback.

  A missing eval split falls back to val/validation/test with a logged note, so
  one config reads both Imagenette (val) and CIFAR-10-images (test) archives.
  """
  available = list(available)
  if wanted in available:
    return wanted
  if allow_fallback:
    for name in EVAL_FALLBACKS:
      if name in available:
        logging.info('data.%s=%r is not in %s; using split %r instead (available: %s).',
                     field, wanted, where, name, available)
        return name
  raise errors.DataError(f'data.{field}={wanted!r} is not in {where} (available: {available}); '
                   f'set --config.data.{field} to one of them.')


def decoded_split(decoded: dict, names: list, labels, class_names: list, side: int, where: str,
                  cache_path: str, split_name: str) -> ImageDataset:
  """The tail of every decoding source: assemble, drop unreadable files, cache, wrap.

  Args:
    decoded: name -> uint8 [side, side, 3] or None (emptied here).
    names: the examples' names in dataset order; `labels` aligned with them.
    where: the split's location, for the skipped-files warning.
    cache_path: where the decoded arrays are cached.
  """
  images, ok = decode.assemble(decoded, names, side)
  images, labels = decode.keep_decoded(images, np.asarray(labels, np.int32), ok,
                                       [str(n) for n in names], where)
  cache.write_cache(cache_path, images, labels, {'class_names': class_names, 'split': split_name})
  return ImageDataset(images, labels, len(class_names), class_names)


class StreamSource:
  """Random access to the encoded examples of a split: len, labels, read(i).

  What the streaming loader (`moco_jax.data.host_crops`) and streamed
  evaluation (`moco_jax.data.eval_reader`) read; each source implements it.
  """
  where: str
  class_names: list

  def __len__(self) -> int:
    raise NotImplementedError

  def label(self, index: int) -> int:
    raise NotImplementedError

  def read(self, index: int):
    """Encoded bytes of example `index` (or a decoded uint8 array)."""
    raise NotImplementedError

  def name(self, index: int) -> str:
    return f'#{index}'
