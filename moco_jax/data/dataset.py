"""What every source returns, and the helpers they share.

`Source` is one kind of data resolved from a `DataSpec` (`moco_jax.data.sources`
picks it); it offers each split two ways: `ImageDataset`, decoded into host
memory, and `StreamSource`, the split's random-access reader. `decoded_split`
is the one tail every decoding source ends with (assemble in order, drop what
did not decode, cache, wrap); `pick_split` resolves a configured split name.
"""

import dataclasses
import hashlib
from typing import Iterable

from absl import logging
import numpy as np

from moco_jax.core import errors
from moco_jax.data import cache
from moco_jax.data import decode
from moco_jax.data import spec as spec_lib
from moco_jax.data.spec import DataSpec, EVAL_FALLBACKS

@dataclasses.dataclass
class ImageDataset:
  """A decoded split: uint8 images [N, S, S, 3] and int32 labels [N]."""
  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  class_names: list

  def __len__(self) -> int:
    return int(self.images.shape[0])


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

  def fingerprint(self) -> dict:
    """{count, sha256, where} of the split's list of examples: a streamed resume compares it.

    This default hashes the count only (a prepared tfds split's files are
    immutable); a reader of a mutable list (a folder) hashes its names and labels.
    """
    digest = hashlib.sha256(str(len(self)).encode())
    return {'count': len(self), 'sha256': digest.hexdigest(), 'where': self.where}


class Source:
  """One kind of data, resolved from a `DataSpec`: what every caller of the data layer holds.

  Each kind (`moco_jax.data.sources.KINDS`) implements `load` and `open` and
  says what it is; planning (`moco_jax.data.streaming.open_split`) decides
  which of the two a split gets.
  """
  streamable = True  # Whether `open` can give a reader (archives and synthetic data: no).

  def __init__(self, spec: DataSpec):
    self.spec = spec

  def count(self, split: str) -> int:
    """Images in `split` ('train' or 'eval'), counted as cheaply as the kind allows."""
    return len(self.open(split))

  def load(self, split: str) -> ImageDataset:
    """`split` decoded into host memory at `spec.side` (cached)."""
    raise NotImplementedError

  def open(self, split: str) -> StreamSource:
    """`split`'s random-access reader."""
    raise NotImplementedError

  def identity(self) -> dict:
    """What names this data without reading it (`spec.identity`)."""
    return spec_lib.identity(self.spec)

  def describe(self) -> str:
    """One line for the log."""
    raise NotImplementedError
