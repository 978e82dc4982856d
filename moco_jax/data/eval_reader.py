"""Reading a streamed split for evaluation: each image decoded once per pass, in order.

Evaluation needs the deterministic view of every image: the same
`decode.decode_value` (shorter side -> S, centre S x S square) as the
in-memory path's decode, so a streamed feature equals an in-memory one. The
images of a batch are decoded in a thread pool (Pillow releases the GIL) while
the accelerator encodes the previous batch; at most `lookahead` batches are
in flight, so host memory is a few batches whatever the split's size.
Unreadable images come back with ok=False: the in-memory path drops them, the
callers mask them.
"""

import collections
import concurrent.futures
from typing import Iterable, Iterator, Optional

from absl import logging
import numpy as np

from moco_jax.core import errors
from moco_jax.data import decode
from moco_jax.data import streaming
from moco_jax.data.dataset import ImageDataset, Source


def read_decoded(source, index: int, side: int) -> Optional[np.ndarray]:
  """uint8 [side, side, C] of example `index` of `source`, or None if unreadable.

  A source with its own `decode(index, side)` (C channels: `listed.ListedReader`) uses it.
  """
  try:
    own = getattr(source, 'decode', None)
    if own is not None:
      return own(index, side)
    return decode.decode_value(source.read(index), side)
  except OSError:
    return None


def decoded_batches(source, batches: Iterable[np.ndarray], side: int, num_workers: int,
                    lookahead: int = 2) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields (images uint8 [b, S, S, 3], ok bool [b]) for each array of indices in `batches`.

  Batches are decoded `lookahead` ahead in a pool of `num_workers` threads; a
  failed image is zeros with ok False.
  """
  with concurrent.futures.ThreadPoolExecutor(max(1, int(num_workers))) as pool:
    pending = collections.deque()

    def submit(indices):
      pending.append([pool.submit(read_decoded, source, int(i), side) for i in indices])

    it = iter(batches)
    for indices in it:
      submit(indices)
      if len(pending) > lookahead:
        break
    while pending:
      futures = pending.popleft()
      for indices in it:  # Keep `lookahead` batches decoding while this one is consumed.
        submit(indices)
        break
      images = np.zeros((len(futures), side, side, getattr(source, 'channels', 3)), np.uint8)
      ok = np.zeros((len(futures),), bool)
      for j, future in enumerate(futures):
        array = future.result()
        if array is not None:
          images[j], ok[j] = array, True
      yield images, ok


def subset_indices(num: int, wanted: int, seed: int = 0) -> np.ndarray:
  """Sorted indices of a fixed random subset of `wanted` of `num` examples (all if it fits)."""
  if wanted >= num:
    return np.arange(num)
  return np.sort(np.random.default_rng(seed).choice(num, wanted, replace=False))


def decode_subset(source, indices: np.ndarray, side: int, num_workers: int,
                  batch: int = 256) -> ImageDataset:
  """The examples `indices` of `source`, decoded into memory; unreadable ones are dropped."""
  images = np.zeros((len(indices), side, side, getattr(source, 'channels', 3)), np.uint8)
  ok = np.zeros((len(indices),), bool)
  chunks = [indices[i:i + batch] for i in range(0, len(indices), batch)]
  start = 0
  for chunk_images, chunk_ok in decoded_batches(source, chunks, side, num_workers):
    images[start:start + len(chunk_ok)], ok[start:start + len(chunk_ok)] = chunk_images, chunk_ok
    start += len(chunk_ok)
  labels = np.asarray([source.label(int(i)) for i in indices], np.int32)
  if not ok.any():
    raise errors.DataError(f'No readable image among {len(indices)} of {source.where}.')
  if not ok.all():
    logging.warning('Skipped %d unreadable images of the %d read from %s.', int((~ok).sum()),
                    len(indices), source.where)
    images, labels = images[ok], labels[ok]
  return ImageDataset(images, labels, len(source.class_names), list(source.class_names))


# A streamed split's in-memory subset never has fewer images than this (a
# 0-GiB budget, as in tests, still gives a usable monitor), nor more than
# fit in half of data.max_in_memory_gb.
SUBSET_FLOOR = 1000


def bounded_split(source: Source, split: str, what: str) -> ImageDataset:
  """`split` decoded into memory, or, when it is streamed, a fixed random subset that fits.

  The report and the kNN monitor need images in memory; for a split larger
  than `data.max_in_memory_gb` they get a deterministic subset (seed 0) of
  max(SUBSET_FLOOR, budget / 2 / image) images, and the log says which.
  """
  opened = streaming.open_split(source, split, evaluation=True, log=False)
  if not opened.stream:
    return opened.data
  spec, reader = source.spec, opened.data
  per_image = spec.side * spec.side * 3
  wanted = max(SUBSET_FLOOR, spec.memory_budget // 2 // per_image)
  indices = subset_indices(len(reader), wanted)
  logging.info('%s: the %s split is streamed (%s); using a fixed random subset of %d of its %d '
               'images (seed 0; half of %s), decoded into memory (%.2f GiB at %d px).', what,
               split, opened.plan.reason, len(indices), len(reader), spec.memory_budget_text,
               len(indices) * per_image / 2**30, spec.side)
  return decode_subset(reader, indices, spec.side, spec.num_workers)
