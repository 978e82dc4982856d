"""The synthetic kind: random uint8 images and labels, for smoke runs, tests and benchmarks.

Each split is a pure function of its name (seed 0 for train, 1 for eval), so
every process and every run sees the same images without reading anything.
"""

import numpy as np

from moco_jax.data.dataset import ImageDataset, StreamSource
from moco_jax.data.spec import DataSpec


def load_synthetic(spec: DataSpec, split: str) -> ImageDataset:
  n, side = spec.synthetic_examples, spec.side
  rng = np.random.default_rng(0 if split == 'train' else 1)
  images = rng.integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)
  labels = rng.integers(0, spec.synthetic_classes, size=(n,)).astype(np.int32)
  names = [f'class_{i}' for i in range(spec.synthetic_classes)]
  return ImageDataset(images, labels, spec.synthetic_classes, names)


class SyntheticReader(StreamSource):
  """The synthetic split as a random-access reader (decoded arrays; for tests and benchmarks)."""

  def __init__(self, spec: DataSpec, split: str):
    self._ds = load_synthetic(spec, split)
    self.class_names, self.where = self._ds.class_names, f'synthetic:{split}'

  def __len__(self) -> int:
    return len(self._ds)

  def label(self, index: int) -> int:
    return int(self._ds.labels[index])

  def read(self, index: int):
    return self._ds.images[index]
