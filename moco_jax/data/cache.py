"""The decoded-array cache: a split decoded once is read back as .npy next time.

Entries live under `DataSpec.cache_dir` (`data.cache_dir`, default ~/.cache/moco_jax), named by a
readable stem and a hash of their key (the source's identity, the split, the
decoded side and `CACHE_VERSION`), so a changed file, size or decoder never
reads a stale entry.
"""

import hashlib
import json
import os
from typing import Optional

from absl import logging
import numpy as np

from moco_jax.core import files

# Bump when decoding/resizing changes, so stale caches are not reused.
# 2: 16-bit and float images scaled to 8 bits (were clipped). 3: the marker holds the arrays'
# sha256, checked on every read.
CACHE_VERSION = 3


def cache_path(cache_dir: str, key: dict, stem: str) -> str:
  """CACHE_DIR/<stem>-<hash of key>: readable, and unique per key (`DataSpec.cache_dir`)."""
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  safe = ''.join(c if c.isalnum() or c in '-_.' else '_' for c in stem)
  return os.path.join(cache_dir, f'{safe}-{digest}')


def read_cache(path: str):
  """(images, labels, meta) from `path`.*, or None when absent or unreadable."""
  marker = path + '.json'
  if not os.path.exists(marker):
    return None
  try:
    with open(marker) as f:
      meta = json.load(f)
    images = np.load(path + '.images.npy')
    labels = np.load(path + '.labels.npy')
    if not len(images) == len(labels) == meta['count']:
      raise ValueError('length mismatch')
    if meta.get('sha256') != _arrays_sha256(images, labels):
      raise ValueError('its contents do not match the checksum in its marker')
  except (OSError, ValueError, KeyError) as e:
    logging.warning('Ignoring unreadable cache %s (%s); decoding again.', path, e)
    return None
  logging.info('Loaded %d decoded images from cache %s.images.npy.', len(images), path)
  return images, labels, meta


def _arrays_sha256(images: np.ndarray, labels: np.ndarray) -> str:
  """The content checksum a cache entry's marker carries (images, then labels)."""
  digest = hashlib.sha256()
  for array in (images, labels):
    digest.update(f'{array.dtype}{array.shape}'.encode())
    digest.update(np.ascontiguousarray(array).data)
  return digest.hexdigest()


def write_cache(path: str, images: np.ndarray, labels: np.ndarray, meta: dict) -> None:
  """Writes the cache; the .json marker comes last, so a partial cache never looks complete.

  Files are written under temporary names and renamed, so concurrent runs
  (several processes of one host) cannot read half-written arrays.
  """
  try:
    files.make_dir(os.path.dirname(path), 'the decode cache')
    for suffix, array in (('.images.npy', images), ('.labels.npy', labels)):
      files.atomic_write(path + suffix, lambda f, a=array: np.save(f, a), binary=True)
    files.atomic_write(path + '.json', lambda f: json.dump(
        {**meta, 'count': int(len(images)), 'shape': list(images.shape),
         'sha256': _arrays_sha256(images, labels)}, f))
    logging.info('Cached %d decoded images at %s.images.npy (set data.cache_dir to move it).',
                 len(images), path)
  except OSError as e:
    logging.warning('Could not write the decode cache at %s (%s); continuing without it.', path, e)


def read_json(path: str) -> Optional[dict]:
  """The JSON object at `path`, or None when absent or unreadable."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def write_json(path: str, value: dict) -> None:
  """Writes `value` atomically; a failure is a warning (these files only save time)."""
  try:
    files.make_dir(os.path.dirname(path), 'the decode cache')
    files.atomic_write(path, lambda f: json.dump(value, f))
  except OSError as e:
    logging.warning('Could not write %s (%s); continuing without it.', path, e)
