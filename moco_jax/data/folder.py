"""The folder source: ImageFolder trees on disk or inside tar archives.

`data.path` names ROOT/{train,val}/<class>/<image> or a .tar/.tgz/.tar.gz of
such a tree (read as is, never unpacked); a single top-level directory
(`imagenette2-128sq/train/...`) is normal. Archives are decoded during the one
pass that lists them.
"""

import hashlib
import os
import tarfile
from typing import Iterator, Optional
import zlib

from absl import logging
from PIL import Image

from moco_jax.core import errors
from moco_jax.data import cache
from moco_jax.data import dataset
from moco_jax.data import decode
from moco_jax.data import spec as spec_lib
from moco_jax.data.spec import ARCHIVE_SUFFIXES, DataSpec, is_archive_name


def member_name(member: tarfile.TarInfo) -> str:
  """Archive member name without a leading './' or trailing '/'."""
  name = member.name
  while name.startswith('./'):
    name = name[2:]
  return name.rstrip('/')


def _split_of(name: str) -> Optional[str]:
  """The split folder of 'split/class/file' or 'top/split/class/file', else None."""
  parts = name.split('/')
  return parts[0] if len(parts) == 3 else parts[1] if len(parts) == 4 else None


def _unreadable_directory(error: OSError):
  """os.walk's onerror: a directory that cannot be listed is an error, not a class left out."""
  raise errors.DataError(
      f'Cannot list {error.filename} ({error.strerror or error}): its images would be left out '
      'without a word. Fix its permissions (e.g. chmod -R a+rX on it) or move it out of '
      'data.path.') from error


def _visible(name: str) -> bool:
  return not any(part.startswith('.') or part == '__MACOSX' for part in name.split('/'))


Image.init()
IMAGE_SUFFIXES = frozenset(Image.registered_extensions())  # '.jpg', '.png', '.tif', ...


def image_name(name: str) -> bool:
  """Whether a file name looks like an image (to tell a stray README from a layout)."""
  return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


# What a truncated or corrupt archive raises while it is streamed.
ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


class Tree:
  """A read-only view of an ImageFolder tree: relative file names and their bytes."""

  def __init__(self, path: str, decode_splits: Optional[dict] = None):
    """Lists the tree; for archives, optionally decodes while listing.

    Args:
      path: the directory or archive (`data.path`).
      decode_splits: archives only: {'splits': names, 'side': S, 'workers': n,
        'decode': fn}. Files of those split folders are decoded during the one
        pass that lists the archive (into `self.decoded`, name -> array or
        None), instead of a second decompression pass once the split is known.
    """
    self.decoded = None
    self._decode_splits = decode_splits
    self.path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(self.path):
      raise errors.DataNotFoundError(
          f'data.path={path!r} does not exist. Set --config.data.path to an ImageFolder '
          'directory ROOT/{train,val}/<class>/<image> or a .tar/.tgz/.tar.gz archive of one.')
    self.is_archive = os.path.isfile(self.path)
    if self.is_archive and not (is_archive_name(self.path) and tarfile.is_tarfile(self.path)):
      raise errors.DataError(f'data.path={path!r} is a file but not a .tar/.tgz/.tar.gz archive; '
                       'point it at an ImageFolder directory or a tar archive of one.')
    self.files = self._list_files()  # Relative names, '/'-separated.
    self.root = self._find_root()

  def _list_files(self) -> list[str]:
    """Lists visible files (and, in self.dirs, directories) in one pass."""
    names, self.dirs = [], set()
    if self.is_archive:
      spec = self._decode_splits
      wanted = self._scan_archive(names)  # Yields the files to decode, lists the rest.
      try:
        if spec:
          self.decoded = decode.decode_stream(wanted, spec['side'], spec['workers'],
                                              spec['decode'])
        else:
          for _ in wanted:
            pass
      except ARCHIVE_ERRORS as e:
        raise errors.DataError(
            f'data.path={self.path!r} is truncated or corrupt ({type(e).__name__}: {e}; '
            f'read {len(names)} files before it failed): download or create the archive '
            'again, or point --config.data.path at an unpacked ImageFolder directory.') from e
      return names
    for dirpath, dirnames, filenames in os.walk(self.path, followlinks=True,
                                                onerror=_unreadable_directory):
      dirnames[:] = sorted(d for d in dirnames if _visible(d))
      rel = os.path.relpath(dirpath, self.path).replace(os.sep, '/')
      prefix = '' if rel == '.' else rel + '/'
      self.dirs.add(prefix.rstrip('/'))
      names.extend(prefix + f for f in sorted(filenames) if _visible(f))
    return names

  def _scan_archive(self, names: list[str]) -> Iterator[tuple[str, bytes]]:
    """Streams the archive: appends every file to `names`, yields (name, bytes) to decode."""
    splits = self._decode_splits['splits'] if self._decode_splits else ()
    with tarfile.open(self.path, 'r|*') as tar:
      for member in tar:
        name = member_name(member)
        if not _visible(name):
          continue
        if member.isdir():
          self.dirs.add(name)
        elif member.isfile():
          names.append(name)
          self.dirs.add(name.rsplit('/', 1)[0] if '/' in name else '')
          if _split_of(name) in splits:
            yield name, tar.extractfile(member).read()

  def _find_root(self) -> str:
    """'' if splits sit at the top, 'name/' if inside a single top-level directory.

    Only image files at split/class/ depth count against a top-level directory:
    a README.txt beside the class folders (top/train/README.txt) is not a layout.
    """
    tops = {n.split('/', 1)[0] for n in self.files if '/' in n}
    if len(tops) == 1:
      top = next(iter(tops))
      inner = {n.split('/')[1] for n in self.files if n.count('/') >= 3 and n.startswith(top + '/')}
      outer = {n.split('/')[0] for n in self.files if n.count('/') == 2 and image_name(n)}
      if inner and not outer:
        return top + '/'
    return ''

  def splits(self) -> list[str]:
    """Directories under the root that hold <class>/<file> entries."""
    found = set()
    for name in self.files:
      if name.startswith(self.root):
        parts = name[len(self.root):].split('/')
        if len(parts) >= 3:
          found.add(parts[0])
    return sorted(found)

  def classes(self, split: str) -> dict[str, list[str]]:
    """class name -> sorted relative file names of `split` (files directly in class dirs)."""
    prefix = f'{self.root}{split}/'
    by_class: dict[str, list[str]] = {}
    for name in self.files:
      if name.startswith(prefix):
        parts = name[len(prefix):].split('/')
        if len(parts) == 2:
          by_class.setdefault(parts[0], []).append(name)
    return {c: sorted(by_class[c]) for c in sorted(by_class)}

  def outside(self, splits: list[str]) -> list[str]:
    """Files that are not directly in a class folder of one of `splits` (ignored)."""
    prefixes = tuple(f'{self.root}{split}/' for split in splits)
    return [n for n in self.files
            if not (n.startswith(prefixes) and n[len(self.root):].count('/') == 2)]

  def class_dirs(self, split: str) -> list[str]:
    """Every class directory of `split`, including empty ones."""
    prefix = f'{self.root}{split}/'
    return sorted({d[len(prefix):] for d in self.dirs
                   if d.startswith(prefix) and '/' not in d[len(prefix):] and d != prefix})

  def fingerprint(self, names: list[str]) -> str:
    """Identity of the data: archive (path, mtime, size) or each file's (name, mtime, size)."""
    digest = hashlib.sha256(self.path.encode())
    if self.is_archive:
      st = os.stat(self.path)
      digest.update(f'{st.st_mtime_ns}:{st.st_size}'.encode())
    else:
      for name in names:
        st = os.stat(os.path.join(self.path, name))
        digest.update(f'{name}:{st.st_mtime_ns}:{st.st_size}\n'.encode())
    return digest.hexdigest()

  def read(self, names: list[str]) -> Iterator[tuple[str, bytes]]:
    """Yields (name, bytes) of a directory tree's files (archives decode while listing)."""
    for name in names:
      with open(os.path.join(self.path, name), 'rb') as f:
        yield name, f.read()


def labelled_files(tree: Tree, spec: DataSpec, split: str) -> tuple[str, list, list, list]:
  """(split dir, class names, file names, labels) of `split` ('train' or 'eval'), checked.

  Labels index the sorted union of train and this split's classes, so train
  and eval labels agree even if one split lacks a class. Both the decoded split
  and the folder's reader list a split with this function.
  """
  split_dir, class_names, by_class = _folder_split(tree, spec, split)
  names, labels = [], []
  for name in by_class:
    names.extend(by_class[name])
    labels.extend([class_names.index(name)] * len(by_class[name]))
  return split_dir, class_names, names, labels


def _folder_split(tree: Tree, spec: DataSpec, split: str) -> tuple[str, list[str], dict]:
  """Checks the tree and returns (split dir, class names, {class: files}) for `split`."""
  available = tree.splits()
  where = f'data.path={tree.path!r}' + (f' (inside {tree.root!r})' if tree.root else '')
  train_dir = spec.train_split
  if train_dir not in available:
    raise errors.DataError(
        f'{where} has no {train_dir!r} folder of class folders (found: {available or "nothing"}). '
        f'Expected ROOT/{train_dir}/<class>/<image>, optionally inside one top-level folder; fix '
        '--config.data.path or --config.data.train_split (images without class folders: '
        '--config.data.labels=none).')
  field = spec_lib.split_field(split)
  split_dir = dataset.pick_split(spec.split_name(split), available, field, where,
                                 allow_fallback=(split == 'eval'))
  by_class = tree.classes(split_dir)
  for name in tree.class_dirs(split_dir):
    if not by_class.get(name):
      raise errors.DataError(f'{where}: class folder {split_dir}/{name}/ has no image files; '
                       'remove it or add images (every class folder must hold at least one).')
  # Labels index the sorted union of train and this split's classes, so train
  # and eval labels agree even if one split lacks a class.
  class_names = sorted(set(tree.classes(train_dir)) | set(by_class))
  ignored = tree.outside(available)
  if ignored:
    logging.warning('Ignored %d files of %s that are not in a <split>/<class>/ folder, e.g. %s.',
                    len(ignored), where, ignored[:3])
  return split_dir, class_names, by_class


def archive_key(spec: DataSpec) -> Optional[dict]:
  """Cache identity of an archive from os.stat alone: a warm run never reads it."""
  if spec.kind != 'archive':
    return None
  path = spec.path
  st = os.stat(path)
  return {'archive': path, 'mtime_ns': st.st_mtime_ns, 'size': st.st_size}


def load_folder(spec: DataSpec, split: str) -> dataset.ImageDataset:
  """The decoded `split` of the ImageFolder tree or archive at `spec.path` (cached)."""
  side, wanted = spec.side, spec.split_name(split)
  stem = os.path.basename(spec.path)
  for suffix in ARCHIVE_SUFFIXES:
    stem = stem[:-len(suffix)] if stem.endswith(suffix) else stem
  base_key = {'kind': 'folder', 'side': side, 'train_split': spec.train_split,
              'split': wanted, 'fallback': split == 'eval', 'version': cache.CACHE_VERSION}
  key_of_archive = archive_key(spec)
  if key_of_archive is not None:  # Archives: look the cache up before listing them.
    path = cache.cache_path(spec.cache_dir, {**base_key, **key_of_archive},
                            f'{stem}-{wanted}-{side}px')
    hit = cache.read_cache(path)
    if hit is not None:
      images, labels, meta = hit
      return dataset.ImageDataset(images, labels, len(meta['class_names']), meta['class_names'])
  decode_splits = None
  if key_of_archive is not None:
    candidates = {wanted} | (set(spec_lib.EVAL_FALLBACKS) if split == 'eval' else set())
    decode_splits = {'splits': candidates, 'side': side, 'decode': decode.decode_image,
                     'workers': spec.num_workers}
    logging.info('Reading %s once: listing it and decoding %s/ at %dx%d with %d threads.',
                 spec.path, '/, '.join(sorted(candidates)), side, side, spec.num_workers)
  tree = Tree(spec.path, decode_splits)
  split_dir, class_names, names, labels = labelled_files(tree, spec, split)
  if key_of_archive is None:  # Directories: the listing (names, sizes, mtimes) is the key.
    key = {**base_key, 'data': tree.fingerprint(names)}
    path = cache.cache_path(spec.cache_dir, key, f'{stem}-{split_dir}-{side}px')
    hit = cache.read_cache(path)
    if hit is not None:
      return dataset.ImageDataset(hit[0], hit[1], len(class_names), class_names)
  decoded = tree.decoded  # Archives: decoded while listing.
  if decoded is None:
    logging.info('Decoding %d images of %s/%s at %dx%d with %d threads.', len(names), tree.path,
                 split_dir, side, side, spec.num_workers)
    decoded = decode.decode_stream(tree.read(names), side, spec.num_workers, decode.decode_image)
  tree.decoded = None
  return dataset.decoded_split(decoded, names, labels, class_names, side,
                               f'{tree.path}/{split_dir}', path, split_dir)


def archive_train_count(spec: DataSpec) -> int:
  """Train images of an archive: one listing pass (headers only), cached by (path, mtime, size).

  A compressed archive still has to be decompressed once to list it; the count
  is what planning needs before deciding to decode it into memory.
  """
  key = {**archive_key(spec), 'kind': 'archive-count', 'train_split': spec.train_split,
         'version': 1}
  path = cache.cache_path(spec.cache_dir, key, 'archive-count') + '.json'
  cached = cache.read_json(path)
  if cached is not None and isinstance(cached.get('count'), int):
    return cached['count']
  tree = Tree(spec.path)
  train_dir = spec.train_split
  count = sum(len(v) for v in tree.classes(train_dir).values()) if train_dir in tree.splits() else 0
  cache.write_json(path, {'count': count})
  return count
