"""Your own images: unlabeled folders at any depth, archives of them, and CSV / text lists.

`data.path` may name, besides an ImageFolder tree (`moco_jax.data.folder`):
  * a directory (or .tar/.tgz/.tar.gz of one) of images at any depth, with no
    class folders: every image file under it, in sorted path order, unlabeled;
    when it holds a `<data.train_split>/` directory, that one is the train split
    and `<data.eval_split>/` (or val/validation/test) the eval split;
  * a list file (.csv, .tsv, .txt): one image per row, paths relative to the
    list's directory (or absolute). A first row naming a `path` (or file,
    filename, image) column is a header, and a `label` (or class, target)
    column gives labels; without a header the first column is the path and a
    second one, if every row has it, the label. .csv is comma-separated,
    .tsv and .txt tab-separated.

`data.labels` says where labels come from: `auto` (default: class folders of a
directory with folders inside folders (an ImageFolder tree) and of archives, a
list's label column, else none: a flat folder or one level of folders),
`folders`, `csv` or `none` (needed for a deeper unlabeled tree). Unlabeled examples have label -1 and no class names: training needs no
labels; kNN and the linear probes refuse such a split (`--mode=embed` writes
its features instead).

When there is no eval directory, `data.val_fraction` > 0 holds out that
fraction of the images as the eval split: a fixed permutation (seed
`HOLDOUT_SEED`, whatever `config.seed` is) of the sorted list, so a resume,
another process or another run sees the same split. The held-out images are
not trained on. With val_fraction 0 there is no eval split, and what needs one
says so.

Each split is offered as a decoded `ImageDataset` (`load_listed`, cached under
data.cache_dir by the files' names, sizes and mtimes) and as a random-access
`ListedReader` (`open_listed_reader`, for the streaming loader and streamed
evaluation; archives are sequential and decoded into memory).
"""

import dataclasses
import hashlib
import os
import tarfile
from typing import Optional

from absl import logging
import numpy as np

from moco_jax.core import errors
from moco_jax.data import cache
from moco_jax.data import channels as channels_lib
from moco_jax.data import dataset
from moco_jax.data import decode
from moco_jax.data import folder
from moco_jax.data import spec as spec_lib
from moco_jax.data.spec import DataSpec
from moco_jax.data import list_file

LIST_SUFFIXES, LABEL_MODES = spec_lib.LIST_SUFFIXES, spec_lib.LABEL_MODES
HOLDOUT_SEED = 0
# Bump when listing or splitting changes, so cached splits are not reused.
LISTED_VERSION = 1


def _abspath(path: str) -> str:
  return os.path.abspath(os.path.expanduser(path))


# --------------------------------------------------------------------------
# Listing.


@dataclasses.dataclass
class Listing:
  """The images of one split: names relative to `root` (or archive members), labels, classes."""
  root: str
  names: list
  labels: np.ndarray
  class_names: list
  where: str
  archive: bool = False
  path: str = ''  # data.path, absolute.


def _image_file(name: str) -> bool:
  return folder.image_name(name) or name.lower().endswith('.npy')


def _list_tree(path: str) -> tuple[list, bool]:
  """(sorted image names under `path`, is_archive); directories walk, archives list headers."""
  names = folder.Tree(path).files  # Archives: validated and listed (headers only).
  images = sorted(n for n in names if _image_file(n))
  skipped = len(names) - len(images)
  if skipped:
    logging.info('Ignored %d files of %s that are not images (by suffix).', skipped, path)
  return images, not os.path.isdir(path)


def holdout(num: int, fraction: float, where: str) -> tuple[np.ndarray, np.ndarray]:
  """(train, eval) sorted positions of a fixed seeded `fraction` held out of `num` images."""
  if not 0 <= fraction < 1:
    raise errors.ConfigError(f'data.val_fraction={fraction!r} must be in [0, 1): the fraction '
                             'of the images held out as the eval split.')
  held = int(round(fraction * num))
  if fraction > 0 and (held == 0 or held == num):
    empty = 'eval' if held == 0 else 'train'
    raise errors.DataError(
        f'data.val_fraction={fraction:g} of the {num} images of {where} leaves an empty '
        f'{empty} split: set --config.data.val_fraction between {1 / num:.3g} and '
        f'{(num - 1) / num:.3g}, or add images.')
  order = np.random.default_rng(HOLDOUT_SEED).permutation(num)
  return np.sort(order[held:]), np.sort(order[:held])


def listing(spec: DataSpec, split: str) -> Listing:
  """The images of `split` ('train' or 'eval') of `data.path`, with labels (-1: none)."""
  spec_lib.split_field(split)
  path, mode, fraction = spec.path, spec.labels, spec.val_fraction
  if spec_lib.is_list_file(path):
    written, label_strings = list_file.read_list(path, mode)
    root = os.path.dirname(path)
    names = [os.path.normpath(n) if os.path.isabs(n) else n for n in written]
    missing = [n for n in names if not os.path.isfile(os.path.join(root, n))]
    if missing:
      raise errors.DataNotFoundError(
          f'{len(missing)} of the {len(names)} images listed in {path} do not exist, e.g. '
          f'{os.path.join(root, missing[0])!r}: paths are relative to the list\'s folder; fix '
          'them or remove those rows.')
    pool = Listing(root, names, np.full(len(names), -1, np.int32), [], path, False, path)
    if label_strings is not None:
      pool.class_names = sorted(set(label_strings))
      number = {c: i for i, c in enumerate(pool.class_names)}
      pool.labels = np.asarray([number[s] for s in label_strings], np.int32)
  else:
    if not os.path.exists(path):
      raise errors.DataNotFoundError(
          f'data.path={spec.path!r} does not exist: set --config.data.path to a folder of '
          'images, a .tar/.tgz of one, an ImageFolder tree or a .csv/.txt list.')
    names, archive = _list_tree(path)
    pool = Listing('' if archive else path, names, np.full(len(names), -1, np.int32), [], path,
                   archive, path)
    top = _top_folder(names, spec.train_split)
    split_dirs = {n[len(top):].split('/', 1)[0] for n in names if '/' in n[len(top):]}
    if spec.train_split in split_dirs:  # ROOT/train/** (and ROOT/val/**): the splits.
      eval_dir = _eval_dir(spec, split_dirs)
      if eval_dir is not None:
        chosen = top + (spec.train_split if split == 'train' else eval_dir)
        keep = [n.startswith(chosen + '/') for n in names]
        return _check_nonempty(_subset(pool, keep, f'{path}/{chosen}'))
      # No eval folder: the train folder is the pool the held-out fraction comes from.
      train_dir = top + spec.train_split
      pool = _subset(pool, [n.startswith(train_dir + '/') for n in names], f'{path}/{train_dir}')
  _check_nonempty(pool)
  if fraction == 0:
    if split == 'eval':
      raise errors.DataError(
          f'{pool.where} has no eval split: set --config.data.val_fraction=0.1 (for example) to '
          'hold out a fixed fraction of its images for evaluation.')
    return pool
  train, held = holdout(len(pool.names), fraction, pool.where)
  chosen = train if split == 'train' else held
  mask = np.zeros(len(pool.names), bool)
  mask[chosen] = True
  return _subset(pool, mask, f'{pool.where} ({split}: {len(chosen)} of {len(pool.names)}, '
                 f'data.val_fraction={fraction:g})')


def _top_folder(names: list, train_split: str) -> str:
  """'top/' when every image sits inside one folder that holds `train_split`/, else ''."""
  tops = {n.split('/', 1)[0] for n in names}
  if len(tops) != 1 or not all('/' in n for n in names):
    return ''
  top = next(iter(tops)) + '/'
  inner = {n[len(top):].split('/', 1)[0] for n in names}
  return top if train_split in inner else ''


def _eval_dir(spec: DataSpec, split_dirs) -> Optional[str]:
  for name in (spec.eval_split,) + spec_lib.EVAL_FALLBACKS:
    if name in split_dirs:
      return name
  return None


def _subset(pool: Listing, mask, where: str) -> Listing:
  mask = np.asarray(mask, bool)
  return Listing(pool.root, [n for n, m in zip(pool.names, mask) if m], pool.labels[mask],
                 pool.class_names, where, pool.archive, pool.path)


def _check_nonempty(found: Listing) -> Listing:
  if not found.names:
    raise errors.DataError(
        f'{found.where} has no image files (at any depth; by suffix: .jpg, .png, .tif, .npy, '
        '...): point --config.data.path at a folder or list that holds images.')
  return found


def digest(found: Listing, stat: bool = True) -> str:
  """sha256 of the listing (names, labels; each file's size and mtime unless an archive)."""
  h = hashlib.sha256(f'{found.root}\n{found.class_names}\n'.encode())
  h.update(np.ascontiguousarray(found.labels).tobytes())
  for name in found.names:
    h.update(name.encode('utf-8', 'surrogateescape'))
    if stat and not found.archive:
      st = os.stat(os.path.join(found.root, name))
      h.update(f':{st.st_mtime_ns}:{st.st_size}\n'.encode())
  if found.archive:
    st = os.stat(found.path)
    h.update(f'{found.path}:{st.st_mtime_ns}:{st.st_size}'.encode())
  return h.hexdigest()


# --------------------------------------------------------------------------
# The two ways to read a split.


class ListedReader(dataset.StreamSource):
  """A listed split on disk: random access by position. Pickles as its names (grain workers)."""

  def __init__(self, found: Listing, channels: int = 3):
    if found.archive:
      raise errors.DataError(
          f'{found.path} is an archive: archives cannot be streamed (read at random); '
          'unpack it into a directory and point --config.data.path at it.')
    self.root, self.class_names, self.where = found.root, list(found.class_names), found.where
    self._names = np.array([n.encode('utf-8', 'surrogateescape') for n in found.names],
                           dtype=np.bytes_)
    self._labels = np.asarray(found.labels, np.int32)
    self._digest = digest(found)
    self.channels = channels  # data.channels: what `decode` keeps.
    self.has_arrays = any(n.lower().endswith(channels_lib.ARRAY_SUFFIXES) for n in found.names)
    self.index_path = f'listing:{self._digest}'  # The stored features' key reads it.

  def __len__(self) -> int:
    return int(self._names.shape[0])

  def label(self, index: int) -> int:
    return int(self._labels[index])

  def name(self, index: int) -> str:
    return bytes(self._names[index]).decode('utf-8', 'surrogateescape')

  def read(self, index: int) -> bytes:
    with open(os.path.join(self.root, self.name(index)), 'rb') as f:
      return f.read()

  def decode(self, index: int, side: int):
    """uint8 [side, side, channels] of example `index` (None if unreadable)."""
    return channels_lib.named_decoder(self.channels)(self.name(index), self.read(index), side)

  def fingerprint(self) -> dict:
    """The listing's identity (names, labels, sizes, mtimes): what a streamed resume compares."""
    return {'count': len(self), 'sha256': self._digest, 'where': self.where}


def open_listed_reader(spec: DataSpec, split: str = 'train') -> ListedReader:
  found = listing(spec, split)
  logging.info('%s: %d images%s.', found.where, len(found.names),
               f', {len(found.class_names)} classes' if found.class_names else ', unlabeled')
  return ListedReader(found, spec.channels)


def load_listed(spec: DataSpec, split: str) -> dataset.ImageDataset:
  """The decoded `split` (uint8 [N, S, S, C], labels -1 when unlabeled), cached."""
  found = listing(spec, split)
  channels, side = spec.channels, spec.side
  key = {'kind': 'listed', 'side': side, 'split': split, 'version': LISTED_VERSION,
         'cache': cache.CACHE_VERSION, 'data': digest(found), 'channels': channels}
  stem = os.path.basename(spec.path)
  path = cache.cache_path(spec.cache_dir, key, f'{stem}-{split}-{side}px')
  hit = cache.read_cache(path)
  if hit is not None:
    return dataset.ImageDataset(hit[0], hit[1], len(found.class_names), list(found.class_names))
  logging.info('Decoding %d images of %s at %dx%d with %d threads (%s).', len(found.names),
               found.where, side, side, spec.num_workers,
               f'{len(found.class_names)} classes' if found.class_names else 'unlabeled')
  if found.archive:
    items = _archive_items(found.path, set(found.names))
  else:
    items = ((n, _read(os.path.join(found.root, n))) for n in found.names)
  named = channels_lib.named_decoder(channels)
  decoded = decode.decode_stream(((n, (n, data)) for n, data in items), side,
                                 spec.num_workers,
                                 lambda item, s: named(item[0], item[1], s))
  return dataset.decoded_split(decoded, found.names, found.labels, list(found.class_names), side,
                               found.where, path, split)


def _read(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def _archive_items(path: str, wanted: set):
  """(name, bytes) of the archive members in `wanted`, in one sequential pass."""
  try:
    with tarfile.open(path, 'r|*') as tar:
      for member in tar:
        name = folder.member_name(member)
        if member.isfile() and name in wanted:
          yield name, tar.extractfile(member).read()
  except folder.ARCHIVE_ERRORS as e:
    raise errors.DataError(f'data.path={path!r} is truncated or corrupt ({e}): create the '
                           'archive again or unpack it into a directory.') from e


def count(spec: DataSpec, split: str = 'train') -> int:
  return len(listing(spec, split).names)

