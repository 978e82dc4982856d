"""Input: decoded uint8 images in host memory, from the source `config.data` names.

The host only decodes (and caches) images at a fixed square size S; random
crops, colour jitter, blur and flips run on the accelerator
(`moco_jax.augmentation.augment`). Keeping the host's work to one decode per image per run
(and none on a warm cache) is what lets a 2-core host feed a GPU: per step the
host only gathers rows of one big uint8 array (`moco_jax.data.batching`).

Sources, chosen by config (`resolve_source`):
  * folder (`moco_jax.data.folder`): `data.path` names an ImageFolder tree
    ROOT/{train,val}/<class>/* or a .tar/.tgz/.tar.gz archive of one.
  * listed (`moco_jax.data.listed`): `data.path` names a folder of images at
    any depth without class folders (or an archive of one), or a .csv/.txt
    list of image paths, with labels per `data.labels`.
  * tfds (`moco_jax.data.tfds_source`): `data.name` in `data.data_dir`,
    downloaded and prepared first if it is not (`data.download`).
  * synthetic: random uint8 images, for throughput benchmarks and tests.

Every source returns images resized to S x S, S = data.cache_size if > 0 else
round(data.image_size x data.cache_ratio) (`image_side`): the shorter side is resized to S (bilinear, antialiased) and
the centre S x S square is kept (`moco_jax.data.decode.fit_square`). Decoded
splits are cached (`moco_jax.data.cache`), so a second run skips decoding.
Every process loads the whole split and takes its own slice of each batch.
"""

import numpy as np

from moco_jax.core import errors
from moco_jax.data import folder
from moco_jax.data import listed
from moco_jax.data import tfds_source
from moco_jax.data.dataset import ImageDataset, StreamSource, image_side, split_field


def resolve_source(data_config) -> str:
  """Which source to read: a set `data.path` means the folder or the listed source."""
  if data_config.get('path', ''):
    kind = 'listed' if listed.is_listed(data_config) else 'folder'
    if kind == 'folder' and int(data_config.get('channels', 3)) != 3:
      raise errors.ConfigError(
          f'data.channels={data_config.channels} is read from folders of your own images and '
          'lists (moco_jax/data/listed.py); an ImageFolder tree is decoded as RGB: set '
          '--config.data.labels=none (unlabeled) or list the images with their labels in a '
          '.csv, or set --config.data.channels=3.')
    return kind
  if int(data_config.get('channels', 3)) != 3:
    raise errors.ConfigError(f'data.channels={data_config.channels} needs data.path (a folder '
                             'or list of your images); tfds and synthetic data are RGB: set '
                             '--config.data.channels=3.')
  source = data_config.source
  if source not in ('tfds', 'folder', 'synthetic'):
    raise errors.ConfigError(f'data.source={source!r} is not one of tfds | folder | synthetic.')
  if source == 'folder':
    raise errors.ConfigError('data.source=folder needs data.path: set --config.data.path to an '
                     'ImageFolder directory ROOT/{train,val}/<class>/* or a .tar/.tgz of one.')
  return source


def load_synthetic(data_config, split: str, side: int) -> ImageDataset:
  n = int(data_config.synthetic_examples)
  rng = np.random.default_rng(0 if split == 'train' else 1)
  images = rng.integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)
  labels = rng.integers(0, data_config.synthetic_classes, size=(n,)).astype(np.int32)
  names = [f'class_{i}' for i in range(data_config.synthetic_classes)]
  return ImageDataset(images, labels, int(data_config.synthetic_classes), names)


class SyntheticSource(StreamSource):
  """The synthetic split as a random-access reader (decoded arrays; for tests and benchmarks)."""

  def __init__(self, data_config, split: str):
    self._ds = load_synthetic(data_config, split, image_side(data_config))
    self.class_names, self.where = self._ds.class_names, f'synthetic:{split}'

  def __len__(self) -> int:
    return len(self._ds)

  def label(self, index: int) -> int:
    return int(self._ds.labels[index])

  def read(self, index: int):
    return self._ds.images[index]


def load_split(data_config, split: str) -> ImageDataset:
  """Loads `split` ('train' or 'eval') of the dataset described by `data_config`.

  Returns uint8 images [N, S, S, 3] (S = `image_side`) and int32 labels.
  Raises FileNotFoundError / ValueError naming the config field to fix.
  """
  split_field(split)
  side = image_side(data_config)
  source = resolve_source(data_config)
  if source == 'synthetic':
    return load_synthetic(data_config, split, side)
  if source == 'folder':
    return folder.load_folder(data_config, split, side)
  if source == 'listed':
    return listed.load_listed(data_config, split, side)
  return tfds_source.load_tfds(data_config, split, side)
