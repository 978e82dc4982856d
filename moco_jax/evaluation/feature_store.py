"""Features of a split too large for host memory: streamed once into a float16 file.

When a split's decoded size exceeds `data.max_in_memory_gb`
(`streaming.open_split`), evaluation does not decode it into memory: each
process reads its slice of every global batch through the split's
random-access reader (`moco_jax.data.eval_reader`: each image decoded once,
the in-memory path's eval view), the backbone encodes the batch on the mesh as
`features.extract_features` does, and the raw (unnormalised) features are
appended to WORKDIR/features/<split>-<key>.f16: N x D x 2 bytes (ImageNet's
1.28 M train images x 2048 (ResNet-50) = 5.2 GB; x 512 (ResNet-18) = 1.3 GB).
Readers map the file (`np.memmap`), so host memory stays a few batches.

A cached file is reused only when its key matches: the backbone's weights (a
hash of every variable, so another checkpoint or the random-init encoder
never matches), the image and decode sizes, normalisation, dtype, the split's
identity and this process's place. It is written under a temporary name and
renamed, and its .json marker (with the key and the sha256 of the feature and
label files, checked on every reuse) is written last, so a killed or failed
write, or a file changed since, is never trusted. A full disk is checked
before the pass and caught during it: one message naming the path.
With several processes, every process receives every feature (the batch is
gathered) and writes its own file, so all of them score the same way.
"""

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import time
from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from moco_jax.core import errors
from moco_jax.core import files
from moco_jax.data import eval_reader
from moco_jax.evaluation import features

FEATURE_DIR = 'features'
# Bump when extraction changes, so older files are not reused.
FEATURE_VERSION = 2  # 2: the marker holds the files' sha256, checked on reuse.
_LOG_EVERY_S = 30.0


@dataclasses.dataclass
class StoredFeatures:
  """A split's raw backbone features on disk, with its labels.

  features: float16 [N, D] (a read-only memmap); rows with valid False are
  unreadable images (the in-memory path drops them).
  """
  features: np.ndarray
  labels: np.ndarray
  valid: np.ndarray
  class_names: list
  path: str

  def __len__(self) -> int:
    return int(self.features.shape[0])

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def variables_digest(variables) -> str:
  """sha256 of every leaf (path, dtype, shape, bytes): the identity of the weights."""
  digest = hashlib.sha256()
  leaves, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(variables))
  for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
    leaf = np.ascontiguousarray(leaf)
    digest.update(f'{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape}'.encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def feature_key(config, spec, source, split: str, weights: str) -> dict:
  """Everything a stored feature depends on; any change means a new file."""
  # A folder's index file is named by its directories' mtimes: files added, removed or renamed
  # give another index, hence another key.
  return {'version': FEATURE_VERSION, 'weights': weights, 'split': split, 'where': source.where,
          'count': len(source), 'index': getattr(source, 'index_path', None), 'side': spec.side,
          'image_size': spec.image_size, 'channels': spec.channels, 'mean': list(config.aug.mean),
          'std': list(config.aug.std), 'dtype': config.model.dtype,
          'model': config.model.to_dict() if hasattr(config.model, 'to_dict') else
                   dict(config.model),
          'process': [jax.process_index(), jax.process_count()]}


def feature_path(workdir: str, split: str, key: dict) -> str:
  """WORKDIR/features/<split>-<hash of key> (+ .f16, .labels.npy, .json)."""
  digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
  suffix = f'-p{jax.process_index()}' if jax.process_count() > 1 else ''
  return os.path.join(workdir, FEATURE_DIR, f'{split}-{digest}{suffix}')


def open_stored(path: str, key: dict) -> Optional[StoredFeatures]:
  """The stored features at `path` if complete and made with `key`, else None (logged)."""
  marker = _read_marker(path)
  if marker is None:
    return None
  if marker.get('key') != json.loads(json.dumps(key, default=str)):
    logging.warning('Not reusing %s.f16: it was made with another key.', path)
    return None
  try:
    count, dim = marker['shape']
    if os.path.getsize(path + '.f16') != count * dim * 2:
      raise ValueError('size mismatch')
    sums = {'f16': files.sha256_of(path + '.f16'),
            'labels': files.sha256_of(path + '.labels.npz')}
    if marker.get('sha256') != sums:
      raise ValueError('its contents do not match the checksums in its marker')
    feats = np.memmap(path + '.f16', np.float16, 'r', shape=(count, dim))
    arrays = np.load(path + '.labels.npz')
    labels, valid = arrays['labels'], arrays['valid']
    if len(labels) != count or len(valid) != count:
      raise ValueError('length mismatch')
  except (OSError, ValueError, KeyError) as e:
    logging.warning('Ignoring unreadable stored features %s (%s); extracting again.', path, e)
    return None
  return StoredFeatures(feats, labels, valid, marker['class_names'], path)


def _read_marker(path: str) -> Optional[dict]:
  try:
    with open(path + '.json') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def stored_features(config, spec, backbone, variables, source, split: str, mesh: Mesh,
                    workdir: str) -> StoredFeatures:
  """The raw features of every example of `source` (a StreamSource of `spec`), stored or now."""
  key = feature_key(config, spec, source, split, variables_digest(variables))
  path = feature_path(workdir, split, key)
  found = open_stored(path, key)
  if found is not None:
    logging.info('Reusing the stored %s features %s.f16 (%d x %d, same weights and config).',
                 split, path, *found.features.shape)
    return found
  return _extract(config, spec, backbone, variables, source, split, mesh, path, key)


def feature_batches(config, spec, backbone, variables, source, mesh: Mesh, start: int = 0):
  """Yields (first row, float16 raw features [b, D], readable [b]) of `source`, from row `start`.

  The streamed side of the one extraction loop (`features.encoded_batches`), for
  the stored features here and `--mode=embed`'s file: every process reads its
  slice of each global batch of rows through `eval_reader` (the in-memory
  path's eval view), the backbone encodes it on the mesh, and every process
  receives the whole batch's rows in order. `start` must be a multiple of the
  global batch (a resumed pass starts where a batch started).
  """
  num = len(source)
  batch = features.eval_batch_size(config.eval.batch_size, mesh.size)
  if start % batch:
    raise ValueError(f'start={start} is not a multiple of the global batch {batch}')
  local = batch // jax.process_count()
  positions = [np.arange(s + jax.process_index() * local, s + (jax.process_index() + 1) * local)
               for s in range(start, num, batch)]
  reads = eval_reader.decoded_batches(source, (np.minimum(p, num - 1) for p in positions),
                                      spec.side, spec.num_workers)
  batches = ((images, p < num, ok) for p, (images, ok) in zip(positions, reads))
  row = start
  for rows, good in features.encoded_batches(config, backbone, variables, mesh, batches):
    rows = rows.astype(np.float16)
    if not np.isfinite(rows).all():
      raise errors.NonFiniteError(
          f'Backbone features of images {row}..{row + len(rows)} of {source.where} are not '
          'finite in float16 (|x| > 65504 or NaN): the checkpoint has diverged.')
    yield row, rows, good
    row += len(rows)


class Progress:
  """A progress line every ~30 s of a pass over `num` rows (rate and time left)."""

  def __init__(self, what: str, num: int, done: int = 0):
    self.what, self.num, self.first = what, num, done
    self.start = self.last = time.perf_counter()

  def update(self, done: int) -> None:
    if time.perf_counter() - self.last > _LOG_EVERY_S:
      self.last = time.perf_counter()
      rate = (done - self.first) / (self.last - self.start)
      logging.info('%s: %d / %d images (%.0f images/s, %.0f s left).', self.what, done,
                   self.num, rate, (self.num - done) / max(rate, 1e-9))


def _extract(config, spec, backbone, variables, source, split, mesh, path,
             key) -> StoredFeatures:
  """Streams `source` through the backbone into `path`.f16, then writes the marker."""
  num = len(source)
  batch = features.eval_batch_size(config.eval.batch_size, mesh.size)
  files.make_dir(os.path.dirname(path), 'the feature store')
  tmp = f'{path}.f16.tmp{os.getpid()}'
  labels = np.asarray([source.label(i) for i in range(num)], np.int32)
  valid = np.zeros((num,), bool)
  dim, written, start = None, 0, time.perf_counter()
  progress = Progress(f'Features of {split}', num)
  logging.info('Extracting %s features of %d images of %s by streaming (%d per batch, '
               'decoding with %d threads) into %s.f16.', split, num, source.where, batch,
               spec.num_workers, path)
  try:
    with open(tmp, 'wb') as out:
      for first, rows, good in feature_batches(config, spec, backbone, variables, source, mesh):
        if dim is None:
          dim = rows.shape[1]
          check_disk(path, num * dim * 2)
        out.write(rows.tobytes())
        valid[first:first + len(rows)] = good
        written = first + len(rows)
        progress.update(written)
    if written != num:
      raise AssertionError(f'extracted {written} features for {num} images')
    files.atomic_write(path + '.labels.npz', lambda f: np.savez(f, labels=labels, valid=valid),
                       binary=True)
    os.replace(tmp, path + '.f16')
    sums = {'f16': files.sha256_of(path + '.f16'),
            'labels': files.sha256_of(path + '.labels.npz')}
    files.atomic_write(path + '.json', lambda f: json.dump(
        {'key': key, 'shape': [num, dim], 'class_names': list(source.class_names),
         'sha256': sums}, f))
  except OSError as e:
    _remove(tmp)
    raise errors.DataError(
        f'Could not write the {split} features to {path}.f16 ({e.strerror or e}); it needs '
        f'{num * (dim or 0) * 2 / 2**30:.2f} GiB under WORKDIR/{FEATURE_DIR}: free space '
        'there or use another --workdir.') from e
  except BaseException:
    _remove(tmp)
    raise
  bad = int((~valid).sum())
  if bad:
    logging.warning('%d of %d images of %s are unreadable: left out, as the in-memory path '
                    'does.', bad, num, source.where)
  elapsed = time.perf_counter() - start
  logging.info('Stored %d x %d %s features (%.2f GiB float16) in %.1f s (%.0f images/s).', num,
               dim, split, num * dim * 2 / 2**30, elapsed, num / max(elapsed, 1e-9))
  return open_stored(path, key)


def check_disk(path: str, needed: int) -> None:
  """Fails before the pass, in one message, when the disk cannot hold the file."""
  free = shutil.disk_usage(os.path.dirname(path)).free
  if free < needed:
    raise errors.DataError(
        f'The features need {needed / 2**30:.2f} GiB at {path}.f16 but only '
        f'{free / 2**30:.2f} GiB are free there: free space or use another --workdir.')


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except OSError:
    pass


@functools.partial(jax.jit, donate_argnums=0)
def _put_rows(out, rows, start):
  return jax.lax.dynamic_update_slice(out, rows, (start, 0))


def to_device(stored: StoredFeatures, block: int = 65536) -> jax.Array:
  """The valid rows of `stored` as one float32 device array, copied one block at a time.

  The host holds one block (block x D x 4 bytes); the device the whole array
  (ImageNet x ResNet-50: 10.5 GB, what the probe trains on anyway).
  """
  rows = np.flatnonzero(stored.valid)
  out = jnp.zeros((len(rows), stored.features.shape[1]), jnp.float32)
  for start in range(0, len(rows), block):
    chunk = np.asarray(stored.features[rows[start:start + block]], np.float32)
    out = _put_rows(out, jnp.asarray(chunk), jnp.int32(start))
  return out
