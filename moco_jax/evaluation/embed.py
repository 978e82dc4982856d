"""`--mode=embed`: the frozen backbone's features of every image of a split, written to disk.

  python main.py --mode=embed --workdir=DIR [--config.embed.split=train|eval]

writes, under WORKDIR/embeddings/:
  <split>.npy        float16 [N, D]: row i is the raw (not L2-normalised) pooled
                     backbone feature of image i; `np.load(path, mmap_mode='r')`
                     maps it without reading it.
  <split>.index.csv  one row per image, in the same order: `row,path[,label],readable`
                     (path absolute for a folder; label the class name when the
                     split has labels; readable 0 for a file that did not decode,
                     whose row is zeros).
  <split>.json       written last: the key (weights hash, data, sizes) and shape;
                     its presence means the pair above is complete.

The pass reads the split through its random-access reader
(`Source.open`, whatever its size), so host memory is a few batches:
the loop is `feature_store.feature_batches`, the one streamed extraction that
the stored features of large-split kNN use too, and its rows equal
`features.extract_features(normalize=False)` of the in-memory split up to
float16 rounding. It is resumable: after each batch the rows are flushed and
`<split>.progress.json` records how many are done and with which key; a rerun
with the same key continues from there (a changed checkpoint or config starts
over). Process 0 writes; every process runs its slice of each batch.
"""

import csv
import json
import os
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from moco_jax.core import errors
from moco_jax.core import files
from moco_jax.core import parallel
from moco_jax.data import sources
from moco_jax.evaluation import feature_store
from moco_jax.evaluation import features
from moco_jax.evaluation import frozen
from moco_jax.evaluation import results

EMBED_DIR = 'embeddings'
SPLITS = ('train', 'eval')


def embedding_paths(workdir: str, split: str) -> dict:
  """{'npy', 'index', 'marker', 'progress', 'readable'} paths of a split's embeddings."""
  base = os.path.join(workdir, EMBED_DIR, split)
  return {'npy': base + '.npy', 'index': base + '.index.csv', 'marker': base + '.json',
          'progress': base + '.progress.json', 'readable': base + '.readable.npy'}


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise errors.ConfigError(f'embed.split={split!r} is not one of {" | ".join(SPLITS)}: set '
                             '--config.embed.split=train (data.train_split) or eval '
                             '(data.eval_split).')


def image_path(source, index: int) -> str:
  """Where image `index` of `source` is: an absolute file path when the source has a root."""
  name = source.name(index)
  root = getattr(source, 'root', None)
  return os.path.join(root, name) if root else name


def embed_key(config, spec, source, split: str, weights: str) -> dict:
  """What the rows depend on (a resumed pass must have the same): the stored features' key
  without this process's place (rows do not depend on how many processes computed them)."""
  key = feature_store.feature_key(config, spec, source, split, weights)
  key.pop('process')
  return json.loads(json.dumps(key, default=str))


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _resume_row(paths: dict, key: dict, num: int, batch: int) -> int:
  """Rows already written with `key` (rounded down to a batch), or 0 to start over."""
  progress = _read_json(paths['progress'])
  if progress is None or progress.get('key') != key:
    if progress is not None:
      logging.info('%s was made with another checkpoint or config: starting over.',
                   paths['progress'])
    return 0
  try:
    rows = np.load(paths['npy'], mmap_mode='r')
    readable = np.load(paths['readable'], mmap_mode='r')
    if rows.shape[0] != num or readable.shape != (num,):
      return 0
  except (OSError, ValueError):
    return 0
  return min(int(progress.get('rows', 0)), num) // batch * batch


def write_index(path: str, source, readable: np.ndarray) -> None:
  """<split>.index.csv: row, path, label (class name, when the split has labels), readable."""
  labelled = bool(source.class_names)

  def write(f):
    out = csv.writer(f, lineterminator='\n')
    out.writerow(['row', 'path'] + (['label'] if labelled else []) + ['readable'])
    for i in range(len(source)):
      label = [source.class_names[source.label(i)]] if labelled else []
      out.writerow([i, image_path(source, i)] + label + [int(readable[i])])

  files.atomic_write(path, write)


def run_embed(config, workdir: str) -> str:
  """Writes WORKDIR/embeddings/<config.embed.split>.npy and its index; returns the .npy path."""
  split = config.get('embed', {}).get('split', 'train')
  check_split(split)
  data = sources.from_config(config)
  source = data.open(split)
  num = len(source)
  if not num:
    raise errors.DataError(f'The {split} split of {source.where} has no images to embed.')
  backbone, variables, step, _ = frozen.load_backbone(config, workdir)
  key = embed_key(config, data.spec, source, split, feature_store.variables_digest(variables))
  key['step'] = int(step)
  paths = embedding_paths(workdir, split)
  marker = _read_json(paths['marker'])
  if marker is not None and marker.get('key') == key and os.path.exists(paths['npy']):
    logging.info('%s is complete for this checkpoint and config (%d x %d): nothing to do.',
                 paths['npy'], *marker['shape'])
    return paths['npy']
  mesh = parallel.make_mesh()
  batch = features.eval_batch_size(config.eval.batch_size, mesh.size)
  writer = jax.process_index() == 0
  start = _resume_row(paths, key, num, batch) if writer else 0
  start = int(multihost_utils.broadcast_one_to_all(np.int32(start)))
  dim = _feature_dim(data.spec, backbone, variables)
  if writer:
    files.make_dir(os.path.dirname(paths['npy']), 'the embeddings')
    _remove(paths['marker'])
    if start == 0:
      feature_store.check_disk(paths['npy'], num * dim * 2)
      np.lib.format.open_memmap(paths['npy'], 'w+', np.float16, (num, dim)).flush()
      np.lib.format.open_memmap(paths['readable'], 'w+', np.bool_, (num,)).flush()
      _write_progress(paths, key, 0)
    else:
      logging.info('Resuming %s at image %d of %d.', paths['npy'], start, num)
    rows_out = np.load(paths['npy'], mmap_mode='r+')
    readable = np.load(paths['readable'], mmap_mode='r+')
  logging.info('Embedding the %s split (%d images of %s, step %d) into %s: %d per batch.', split,
               num, source.where, step, paths['npy'], batch)
  progress = feature_store.Progress(f'Embeddings of {split}', num, start)
  began = time.perf_counter()
  for first, rows, good in feature_store.feature_batches(config, data.spec, backbone, variables,
                                                         source, mesh, start):
    if writer:
      rows_out[first:first + len(rows)] = np.where(good[:, None], rows, 0)  # Unreadable: zeros.
      readable[first:first + len(rows)] = good
      rows_out.flush()
      readable.flush()
      _write_progress(paths, key, first + len(rows))
    progress.update(first + len(rows))
  if writer:
    write_index(paths['index'], source, np.asarray(readable))
    del rows_out
    files.atomic_write(paths['marker'], lambda f: json.dump(
        {'key': key, 'shape': [num, dim], 'dtype': 'float16', 'split': split,
         'where': source.where, 'index': os.path.basename(paths['index'])}, f, indent=2))
    _remove(paths['progress'])
    bad = int((~np.asarray(readable)).sum())
    if bad:
      logging.warning('%d of %d images of %s are unreadable: their rows are zeros and '
                      'readable=0 in %s.', bad, num, source.where, paths['index'])
  elapsed = time.perf_counter() - began
  logging.info('Embedded %d images (%d x %d float16, %.1f s, %.0f images/s).', num - start, num,
               dim, elapsed, (num - start) / max(elapsed, 1e-9))
  results.write_results(workdir, {f'embed_{split}_step': step})
  return paths['npy']


def _feature_dim(spec, backbone, variables) -> int:
  """D of the backbone's pooled features (shape inference, no compute)."""
  side = spec.image_size
  out = jax.eval_shape(lambda v, x: backbone.apply(v, x, train=False), variables,
                       jax.ShapeDtypeStruct((1, side, side, spec.channels), np.float32))
  return int(out.shape[-1])


def _write_progress(paths: dict, key: dict, rows: int) -> None:
  files.atomic_write(paths['progress'], lambda f: json.dump({'key': key, 'rows': rows}, f))


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except OSError:
    pass
