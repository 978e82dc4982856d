"""The folder source's random-access reader: an ImageFolder directory's file list, indexed once.

The decoded in-memory split of a folder is `moco_jax.data.folder.load_folder`;
this is the same split for the streaming loader and streamed evaluation: the
file list of the split (same checks, order and labels as the in-memory path)
is written once under data.cache_dir as .npy files and read back with mmap,
so grain worker processes share its pages and a warm run lists nothing.
Archives are sequential and have no reader (`moco_jax.data.streaming` says so).
"""

import hashlib
import os
from typing import Optional

from absl import logging
import numpy as np

from moco_jax.core import errors
from moco_jax.core import files
from moco_jax.data import cache
from moco_jax.data import folder
from moco_jax.data.dataset import StreamSource
from moco_jax.data.spec import DataSpec

# Bump when the index format changes.
INDEX_VERSION = 1


class FolderReader(StreamSource):
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

  def fingerprint(self) -> dict:
    """Hashes the indexed names and labels (about 0.1 s per million files)."""
    self._open()
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(self._names).tobytes())
    digest.update(np.ascontiguousarray(self._labels).tobytes())
    digest.update(str(len(self)).encode())
    return {'count': len(self), 'sha256': digest.hexdigest(), 'where': self.where}


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


def open_folder_reader(spec: DataSpec, which: str = 'train') -> FolderReader:
  """Lists a split once (same checks and errors as the in-memory path), then caches it."""
  path, split = spec.path, spec.split_name(which)
  stem = os.path.basename(path)
  base = {'kind': 'folder-index', 'path': path, 'train_split': split, 'version': INDEX_VERSION}
  if which != 'train':
    base['split'] = which
  # The split usually sits at the top or inside one top-level directory:
  # key the index on their directory mtimes, so a warm run lists nothing.
  for top in ('', _single_subdir(path)):
    if top is None or not os.path.isdir(os.path.join(path, top, split)):
      continue
    key = {**base, 'top': top, 'dirs': _split_dirs_key(os.path.join(path, top), split)}
    train_dir = os.path.join(path, top, spec.train_split)
    if which != 'train' and os.path.isdir(train_dir):  # Labels index train + eval classes.
      key['train_dirs'] = _split_dirs_key(os.path.join(path, top), spec.train_split)
    index_path = cache.cache_path(spec.cache_dir, key, f'{stem}-{split}-index')
    meta = cache.read_json(index_path + '.json')
    if meta is not None and os.path.exists(index_path + '.names.npy'):
      logging.info('Using the cached file list of %s (%d files): %s.names.npy.',
                   meta['where'], meta['count'], index_path)
      return FolderReader(path, index_path, meta['class_names'], meta['where'])
    break
  else:
    index_path = None
  logging.info('Listing %s once (the list is cached under data.cache_dir).', path)
  tree = folder.Tree(path)
  split_dir, class_names, names, labels = folder.labelled_files(tree, spec, which)
  where = f'{path}/{tree.root}{split_dir}'
  if index_path is None:  # Unusual layout: key on the listing itself.
    digest = hashlib.sha256('\n'.join(names).encode('utf-8', 'surrogateescape')).hexdigest()
    index_path = cache.cache_path(spec.cache_dir, {**base, 'names': digest},
                                  f'{stem}-{split}-index')
  encoded = np.array([n.encode('utf-8', 'surrogateescape') for n in names], dtype=np.bytes_)
  try:
    files.make_dir(os.path.dirname(index_path), 'the file index')
    for suffix, array in (('.names.npy', encoded), ('.labels.npy', np.asarray(labels, np.int32))):
      files.atomic_write(index_path + suffix, lambda f, a=array: np.save(f, a), binary=True)
    cache.write_json(index_path + '.json', {'count': len(names), 'class_names': class_names,
                                            'where': where})
  except OSError as e:
    raise errors.DataError(f'Cannot write the file list of {where} under data.cache_dir '
                           f'({e}); set --config.data.cache_dir to a writable directory.') from e
  logging.info('Indexed %d files of %s (%d classes) at %s.names.npy.', len(names), where,
               len(class_names), index_path)
  return FolderReader(path, index_path, class_names, where)


def _single_subdir(path: str) -> Optional[str]:
  """The only visible sub-directory of `path` (e.g. imagenette2/), else None."""
  try:
    subdirs = [e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith('.')]
  except OSError:
    return None
  return subdirs[0] if len(subdirs) == 1 else None
