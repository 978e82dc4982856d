"""Streaming input: train splits too large to decode into host memory.

Small splits keep the decoded in-memory path (`load_split`, optionally
`data.on_device`): one decode per image per run, then only gathers. A split
whose decoded size (N x S x S x 3 bytes) exceeds `data.max_in_memory_gb`
(default: 25% of the host's RAM) is streamed instead (`plan_train_input`
decides, and says why in the log):

  * Every step, each JAX process reads and decodes only its own 1/P slice of
    the global batch: the examples of step s are `train_indices(N, B, seed, s)`
    (the in-memory path's order), sliced by process.
  * The host decodes each image once per step and cuts MoCo's two
    RandomResizedCrop views from the whole original image
    (`moco_jax.data.host_crops`); colour ops stay on the accelerator.
  * The loader is grain: a `MapDataset` over this process's flat example
    positions, mapped by `LoadExample`, batched, read with threads
    (`ReadOptions`) and optionally worker processes (`mp_prefetch`). Because
    the order is a pure function of (seed, step), resuming at step s is
    slicing the dataset at s: no iterator state needs checkpointing.
  * An unreadable file is replaced by another example chosen
    deterministically from (seed, index, attempt), counted in the batch's
    'skipped' field and reported by the caller; it never stops the run.

Sources: ImageFolder directories (`FolderSource`: the file list of the split
is indexed once and cached under data.cache_dir as .npy, read back with mmap
so worker processes share it) and prepared tfds datasets (`TfdsSource`, via
`tfds.data_source`: array_record files allow random access). Tar archives
are sequential, so a split too large for memory must be unpacked into a
directory (the error says so).

This module imports neither JAX nor TensorFlow (tfds only for tfds sources),
so grain worker processes start quickly.
"""

import dataclasses
import hashlib
import json
import os
from typing import Optional

from absl import logging
import numpy as np

from moco_jax.core import errors
from moco_jax.core import files
from moco_jax.data import cache
from moco_jax.data import dataset
from moco_jax.data import folder
from moco_jax.data import sources
from moco_jax.data import tfds_source

# Bump when the index format changes.
_INDEX_VERSION = 1


# --------------------------------------------------------------------------
# Which path: in memory or streamed.


def host_memory_bytes() -> int:
  """MemTotal of this host (Linux /proc/meminfo; sysconf elsewhere)."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemTotal:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return int(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))


def memory_budget_bytes(data_config) -> tuple[int, str]:
  """(bytes, description) of `data.max_in_memory_gb`; -1 means 25% of host RAM."""
  gb = float(data_config.get('max_in_memory_gb', -1))
  if gb < 0:
    total = host_memory_bytes()
    return total // 4, f'25% of this host\'s {total / 2**30:.1f} GiB RAM (data.max_in_memory_gb=-1)'
  return int(gb * 2**30), f'data.max_in_memory_gb={gb:g}'


@dataclasses.dataclass
class Plan:
  """How the train split is read: streamed (with its source) or decoded into memory."""
  stream: bool
  reason: str
  source: Optional['StreamSource'] = None


def plan_train_input(data_config) -> Plan:
  """Decides between the in-memory and the streaming path for the train split, and logs why.

  The decoded size is N x S x S x 3 bytes (S = `image_side`, what the
  in-memory path would hold). Synthetic data always stays in memory.
  """
  source = sources.resolve_source(data_config)
  if source == 'synthetic':
    return Plan(False, 'synthetic data is generated in memory')
  side = dataset.image_side(data_config)
  budget, budget_text = memory_budget_bytes(data_config)
  if source == 'folder' and _is_archive(data_config.path):
    return _plan_archive(data_config, side, budget, budget_text)
  if source == 'tfds':  # Only open the data source (array_record files) to stream.
    builder, split = _tfds_builder(data_config)
    splits = builder.info.splits
    count = splits[split].num_examples if split in splits.keys() else 0
    where = f'tfds {data_config.name}:{split}'
    stream_source = None
    if not count:  # A mocked builder (tfds.testing.mock_data) lists no splits.
      stream_source = open_source(data_config)
      count = len(stream_source)
  else:
    stream_source = open_source(data_config)
    count, where = len(stream_source), stream_source.where
  size = count * side * side * 3
  what = (f'the train split ({count:,} images of {where}) decodes to {size / 2**30:.2f} GiB '
          f'at {side} px')
  if size > budget:
    plan = Plan(True, f'{what} > {budget / 2**30:.2f} GiB = {budget_text}: streaming it',
                stream_source or open_source(data_config))
  else:
    plan = Plan(False, f'{what} <= {budget / 2**30:.2f} GiB = {budget_text}: decoding it into '
                'memory once')
  logging.info('Input: %s.', plan.reason)
  return plan


def _is_archive(path: str) -> bool:
  path = os.path.abspath(os.path.expanduser(path))
  return os.path.isfile(path) and path.lower().endswith(folder.ARCHIVE_SUFFIXES)


def _plan_archive(data_config, side: int, budget: int, budget_text: str) -> Plan:
  """Archives stay on the in-memory path; one too large for memory is refused, clearly.

  The number of train images is counted by one listing pass over the archive
  (headers only; a compressed archive still has to be decompressed once) and
  cached by the archive's (path, mtime, size), so it is paid once.
  """
  count = _archive_train_count(data_config)
  size = count * side * side * 3
  what = (f'data.path={data_config.path!r} is an archive whose {count:,} train images decode to '
          f'{size / 2**30:.2f} GiB at {side} px')
  if size > budget:
    raise errors.DataError(
        f'{what}, more than {budget / 2**30:.2f} GiB = {budget_text}. Tar archives are read '
        'sequentially and cannot be streamed: large sets must be directories. Unpack it '
        f'(mkdir DIR && tar xf {data_config.path} -C DIR) and set --config.data.path=DIR, '
        'or raise --config.data.max_in_memory_gb if this host has the memory.')
  plan = Plan(False, f'{what} <= {budget / 2**30:.2f} GiB = {budget_text}: decoding it into '
              'memory once')
  logging.info('Input: %s.', plan.reason)
  return plan


def _archive_train_count(data_config) -> int:
  key = folder._archive_key(data_config.path)  # pylint: disable=protected-access
  key = {**key, 'kind': 'archive-count', 'train_split': data_config.train_split,
         'version': _INDEX_VERSION}
  path = cache.cache_path(data_config, key, 'archive-count') + '.json'
  try:
    with open(path) as f:
      return int(json.load(f)['count'])
  except (OSError, ValueError, KeyError):
    pass
  tree = folder.Tree(data_config.path)
  train_dir = data_config.train_split
  count = sum(len(v) for v in tree.classes(train_dir).values()) if train_dir in tree.splits() else 0
  _write_json(path, {'count': count})
  return count


# --------------------------------------------------------------------------
# Sources: random access to encoded examples.


class StreamSource:
  """Random access to the encoded examples of a split: len, labels, read(i)."""
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


class FolderSource(StreamSource):
  """An ImageFolder split on disk, from its cached index (.npy files opened with mmap).

  Pickles as its paths only: grain worker processes map the same index pages.
  """

  def __init__(self, root: str, index_path: str, class_names: list, where: str):
    self.root, self.index_path, self.class_names, self.where = root, index_path, class_names, where
    self._names = self._labels = None

  def _open(self):
    if self._names is None:
      self._names = np.load(self.index_path + '.names.npy', mmap_mode='r')
      self._labels = np.load(self.index_path + '.labels.npy', mmap_mode='r')

  def __getstate__(self):
    return {**self.__dict__, '_names': None, '_labels': None}

  def __len__(self) -> int:
    self._open()
    return int(self._names.shape[0])

  def label(self, index: int) -> int:
    self._open()
    return int(self._labels[index])

  def name(self, index: int) -> str:
    self._open()
    return bytes(self._names[index]).decode('utf-8', 'surrogateescape')

  def read(self, index: int) -> bytes:
    with open(os.path.join(self.root, self.name(index)), 'rb') as f:
      return f.read()


class TfdsSource(StreamSource):
  """A prepared tfds split through `tfds.data_source` (random access; array_record files)."""

  def __init__(self, data_source, class_names: list, where: str):
    self.data_source, self.class_names, self.where = data_source, class_names, where

  def __len__(self) -> int:
    return len(self.data_source)

  def label(self, index: int) -> int:
    return int(self.data_source[index]['label'])

  def read(self, index: int):
    return self.data_source[index]['image']


def open_source(data_config) -> StreamSource:
  """The train split of `data_config` as a StreamSource (folder directory or tfds)."""
  source = sources.resolve_source(data_config)
  if source == 'folder':
    if _is_archive(data_config.path):
      raise errors.DataError(f'data.path={data_config.path!r} is an archive: archives cannot be '
                       'streamed; unpack it into a directory and point data.path at it.')
    return _folder_source(data_config)
  if source == 'tfds':
    return _tfds_source(data_config)
  raise errors.ConfigError(f'data.source={source!r} cannot be streamed (only folder and tfds).')


def _split_dirs_key(root: str, split_dir: str) -> list:
  """(name, mtime) of the split directory and each of its class directories.

  A directory's mtime changes when entries are added, removed or renamed in
  it, so this identifies the file list without a stat per file (1,000 stats
  for ImageNet instead of 1.28 M).
  """
  path = os.path.join(root, split_dir)
  key = [(split_dir, os.stat(path).st_mtime_ns)]
  with os.scandir(path) as entries:
    for entry in sorted(entries, key=lambda e: e.name):
      if entry.is_dir(follow_symlinks=True):
        key.append((entry.name, entry.stat(follow_symlinks=True).st_mtime_ns))
  return key


def _folder_source(data_config) -> FolderSource:
  """Lists the train split once (same checks and errors as the in-memory path), then caches it."""
  path = os.path.abspath(os.path.expanduser(data_config.path))
  split = data_config.train_split
  stem = os.path.basename(path)
  base = {'kind': 'folder-index', 'path': path, 'train_split': split, 'version': _INDEX_VERSION}
  # The split usually sits at the top or inside one top-level directory:
  # key the index on their directory mtimes, so a warm run lists nothing.
  for top in ('', _single_subdir(path)):
    if top is None or not os.path.isdir(os.path.join(path, top, split)):
      continue
    key = {**base, 'top': top, 'dirs': _split_dirs_key(os.path.join(path, top), split)}
    index_path = cache.cache_path(data_config, key, f'{stem}-{split}-index')
    meta = _read_json(index_path + '.json')
    if meta is not None and os.path.exists(index_path + '.names.npy'):
      logging.info('Using the cached file list of %s (%d files): %s.names.npy.',
                   meta['where'], meta['count'], index_path)
      return FolderSource(path, index_path, meta['class_names'], meta['where'])
    break
  else:
    index_path = None
  logging.info('Listing %s once (the list is cached under data.cache_dir).', path)
  tree = folder.Tree(path)
  split_dir, class_names, by_class = folder._folder_split(  # pylint: disable=protected-access
      tree, data_config, 'train')
  names, labels = [], []
  for name in by_class:
    names.extend(by_class[name])
    labels.extend([class_names.index(name)] * len(by_class[name]))
  where = f'{path}/{tree.root}{split_dir}'
  if index_path is None:  # Unusual layout: key on the listing itself.
    digest = hashlib.sha256('\n'.join(names).encode('utf-8', 'surrogateescape')).hexdigest()
    index_path = cache.cache_path(data_config, {**base, 'names': digest},
                                  f'{stem}-{split}-index')
  encoded = np.array([n.encode('utf-8', 'surrogateescape') for n in names], dtype=np.bytes_)
  try:
    os.makedirs(os.path.dirname(index_path), exist_ok=True)
    for suffix, array in (('.names.npy', encoded), ('.labels.npy', np.asarray(labels, np.int32))):
      files.atomic_write(index_path + suffix, lambda f, a=array: np.save(f, a), binary=True)
    _write_json(index_path + '.json', {'count': len(names), 'class_names': class_names,
                                       'where': where})
  except OSError as e:
    raise errors.DataError(f'Cannot write the file list of {where} under data.cache_dir '
                  f'({e}); set --config.data.cache_dir to a writable directory.') from e
  logging.info('Indexed %d files of %s (%d classes) at %s.names.npy.', len(names), where,
               len(class_names), index_path)
  return FolderSource(path, index_path, class_names, where)


def _single_subdir(path: str) -> Optional[str]:
  """The only visible sub-directory of `path` (e.g. imagenette2/), else None."""
  try:
    subdirs = [e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith('.')]
  except OSError:
    return None
  return subdirs[0] if len(subdirs) == 1 else None


def _tfds_builder(data_config):
  """(prepared builder, train split name); the in-memory path's errors otherwise.

  A download prepares tfds' default format, which the in-memory reader needs;
  streaming needs array_record and says so (`_tfds_source`).
  """
  builder = tfds_source.prepared_builder(data_config)
  available = list(builder.info.splits.keys())
  wanted = data_config.train_split
  split = wanted if not available else dataset.pick_split(
      wanted, available, 'train_split', f'tfds {data_config.name!r}', allow_fallback=False)
  return builder, split


def _tfds_source(data_config) -> TfdsSource:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder, split = _tfds_builder(data_config)
  try:
    source = builder.as_data_source(split=split,
                                    decoders={'image': tfds.decode.SkipDecoding()})
  except (NotImplementedError, ValueError, FileNotFoundError) as e:
    raise errors.DataError(
        f'tfds {data_config.name}:{split} has no random-access files ({e}). Streaming needs '
        'it prepared as array_record (tfds build --file_format=array_record), or an '
        'ImageFolder directory via --config.data.path=DIR.') from e
  class_names = list(builder.info.features['label'].names)
  return TfdsSource(source, class_names, f'tfds {data_config.name}:{split}')


def _read_json(path: str) -> Optional[dict]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _write_json(path: str, value: dict) -> None:
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    files.atomic_write(path, lambda f: json.dump(value, f))
  except OSError as e:
    logging.warning('Could not write %s (%s); continuing without it.', path, e)
