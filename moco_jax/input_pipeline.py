"""Input pipeline: decoded uint8 images in host memory, batches by step.

The host only decodes (and caches) images at a fixed square size S; random
crops, colour jitter, blur and flips run on the accelerator
(`moco_jax.augment`). Keeping the host's work to one decode per image per run
(and none on a warm cache) is what lets a 2-core host feed a GPU: per step the
host only gathers rows of one big uint8 array.

Sources, chosen by config (`resolve_source`):
  * folder: `data.path` names an ImageFolder tree ROOT/{train,val}/<class>/*
    or a .tar/.tgz/.tar.gz archive of one (read as is, never unpacked). A
    single top-level directory (`imagenette2-128sq/train/...`) is normal.
  * tfds: `data.name` in `data.data_dir`, read only if already prepared there
    (this code never downloads: the machines it runs on are offline).
  * synthetic: random uint8 images, for throughput benchmarks and tests.

Every source returns images resized to S x S, S = data.cache_size if > 0 else
data.image_size: the shorter side is resized to S (bilinear, antialiased) and
the centre S x S square is kept, so non-square images lose their borders along
the longer side (as torchvision's Resize(S) + CenterCrop(S) would).

Decoded splits are cached as .npy under data.cache_dir, keyed by the source
(path, mtime, size; or the tfds name and version), the split and S, so a
second run skips decoding.

The order of training examples is a pure function of (seed, step), so a
resumed run reads exactly the batches an uninterrupted run would have read.
Every process loads the whole split and takes its own slice of each global
batch (`process_index`), which is all multi-host training needs.
"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import json
import os
import queue
import tarfile
import threading
from typing import Callable, Iterable, Iterator, Optional

from absl import logging
import numpy as np
from PIL import Image

# Bump when decoding/resizing changes, so stale caches are not reused.
_CACHE_VERSION = 1
# Splits tried, in order, when the configured eval split is missing:
# ImageFolder archives use val/ (Imagenette) or test/ (CIFAR-10-images).
_EVAL_FALLBACKS = ('val', 'validation', 'test')
_ARCHIVE_SUFFIXES = ('.tar', '.tgz', '.tar.gz')
# Errors Pillow raises for truncated, corrupt or non-image files.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclasses.dataclass
class ImageDataset:
  """A decoded split: uint8 images [N, S, S, 3] and int32 labels [N]."""
  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  class_names: list

  def __len__(self) -> int:
    return int(self.images.shape[0])


# --------------------------------------------------------------------------
# Config helpers.


def image_side(data_config) -> int:
  """The square side S images are decoded to (and cached at)."""
  cache_size = int(data_config.get('cache_size', -1))
  return cache_size if cache_size > 0 else int(data_config.image_size)


def resolve_source(data_config) -> str:
  """Which source to read: a set `data.path` always means the folder source."""
  if data_config.get('path', ''):
    return 'folder'
  source = data_config.source
  if source not in ('tfds', 'folder', 'synthetic'):
    raise ValueError(f'data.source={source!r} is not one of tfds | folder | synthetic.')
  if source == 'folder':
    raise ValueError('data.source=folder needs data.path: set --config.data.path to an '
                     'ImageFolder directory ROOT/{train,val}/<class>/* or a .tar/.tgz of one.')
  return source


def split_field(split: str) -> str:
  """The config field naming the split: 'train' -> train_split, 'eval' -> eval_split."""
  if split not in ('train', 'eval'):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}.")
  return f'{split}_split'


def cache_dir(data_config) -> str:
  """Where decoded arrays are cached ('' in the config = ~/.cache/moco_jax)."""
  path = data_config.get('cache_dir', '') or os.path.join('~', '.cache', 'moco_jax')
  return os.path.abspath(os.path.expanduser(path))


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
    for name in _EVAL_FALLBACKS:
      if name in available:
        logging.info('data.%s=%r is not in %s; using split %r instead (available: %s).',
                     field, wanted, where, name, available)
        return name
  raise ValueError(f'data.{field}={wanted!r} is not in {where} (available: {available}); '
                   f'set --config.data.{field} to one of them.')


# --------------------------------------------------------------------------
# Decoding.


def fit_square(image: Image.Image, side: int) -> np.ndarray:
  """Resizes the shorter side to `side` and keeps the centre square, as uint8 RGB.

  One `resize(box=...)` call crops and resizes together, which is both faster
  and sharper than resizing the whole image first. Smaller images are upscaled.
  """
  if image.mode != 'RGB':
    image = image.convert('RGB')
  w, h = image.size
  if (w, h) != (side, side):
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    image = image.resize((side, side), Image.BILINEAR, box=(left, top, left + s, top + s))
  return np.asarray(image, dtype=np.uint8)


def decode_image(data: bytes, side: int) -> Optional[np.ndarray]:
  """Decodes encoded image bytes to uint8 [side, side, 3], or None if unreadable.

  Grayscale, palette, CMYK and RGBA images are converted to RGB (alpha is
  dropped, like torchvision's ImageFolder loader). JPEGs much larger than
  `side` are decoded at a reduced DCT scale (`draft`), which is several times
  faster and still leaves the shorter side >= `side`.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.draft('RGB', (side, side))
      image.load()
      return fit_square(image, side)
  except _DECODE_ERRORS:
    return None


def decode_stream(items: Iterable[tuple[str, bytes]], side: int, num_workers: int,
                  decode: Optional[Callable] = None, chunk: int = 32) -> dict:
  """Decodes (name, bytes) pairs in a thread pool while `items` is still being read.

  Pillow releases the GIL while decoding and resizing, so threads scale for
  photos (Imagenette). For tiny images (CIFAR's 1 KB JPEGs) Pillow's per-file
  Python work holds the GIL and dominates; a spawned process pool would
  scale, but breaks any caller script without a `__main__` guard, so it is
  not used. Work goes out in chunks of `chunk` files (per-task overhead
  matters at 32 px), and only a few hundred encoded files are in flight, so
  an archive is streamed rather than held in memory.
  Returns {name: uint8 [side, side, 3], or None if unreadable}.
  """
  decode = decode or decode_image
  decoded = {}

  def work(batch):
    for name, data in batch:
      decoded[name] = decode(data, side)

  workers = max(1, num_workers)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending, batch = [], []
    for item in items:
      batch.append(item)
      if len(batch) == chunk:
        pending.append(pool.submit(work, batch))
        batch = []
      if len(pending) >= 8 * workers:  # Bound the encoded bytes in flight.
        for future in pending[:4 * workers]:
          future.result()
        pending = pending[4 * workers:]
    pending.append(pool.submit(work, batch))
    for future in pending:
      future.result()
  return decoded


def assemble(decoded: dict, names: list[str], side: int) -> tuple[np.ndarray, np.ndarray]:
  """(images [len(names), S, S, 3], ok [len(names)]) in `names` order; empties `decoded`."""
  images = np.zeros((len(names), side, side, 3), np.uint8)
  ok = np.zeros((len(names),), bool)
  for i, name in enumerate(names):
    array = decoded.pop(name, None)
    if array is not None:
      images[i], ok[i] = array, True
  return images, ok


# --------------------------------------------------------------------------
# Folder source: ImageFolder trees on disk or inside tar archives.


def _is_archive(path: str) -> bool:
  return path.lower().endswith(_ARCHIVE_SUFFIXES)


def _member_name(member: tarfile.TarInfo) -> str:
  """Archive member name without a leading './' or trailing '/'."""
  name = member.name
  while name.startswith('./'):
    name = name[2:]
  return name.rstrip('/')


def _split_of(name: str) -> Optional[str]:
  """The split folder of 'split/class/file' or 'top/split/class/file', else None."""
  parts = name.split('/')
  return parts[0] if len(parts) == 3 else parts[1] if len(parts) == 4 else None


def _visible(name: str) -> bool:
  return not any(part.startswith('.') or part == '__MACOSX' for part in name.split('/'))


class _Tree:
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
      raise FileNotFoundError(
          f'data.path={path!r} does not exist. Set --config.data.path to an ImageFolder '
          'directory ROOT/{train,val}/<class>/<image> or a .tar/.tgz/.tar.gz archive of one.')
    self.is_archive = os.path.isfile(self.path)
    if self.is_archive and not (_is_archive(self.path) and tarfile.is_tarfile(self.path)):
      raise ValueError(f'data.path={path!r} is a file but not a .tar/.tgz/.tar.gz archive; '
                       'point it at an ImageFolder directory or a tar archive of one.')
    self.files = self._list_files()  # Relative names, '/'-separated.
    self.root = self._find_root()

  def _list_files(self) -> list[str]:
    """Lists visible files (and, in self.dirs, directories) in one pass."""
    names, self.dirs = [], set()
    if self.is_archive:
      spec = self._decode_splits
      wanted = self._scan_archive(names)  # Yields the files to decode, lists the rest.
      if spec:
        self.decoded = decode_stream(wanted, spec['side'], spec['workers'], spec['decode'])
      else:
        for _ in wanted:
          pass
      return names
    for dirpath, dirnames, filenames in os.walk(self.path, followlinks=True):
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
        name = _member_name(member)
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
    """'' if splits sit at the top, 'name/' if inside a single top-level directory."""
    tops = {n.split('/', 1)[0] for n in self.files if '/' in n}
    if len(tops) == 1:
      top = next(iter(tops))
      inner = {n.split('/')[1] for n in self.files if n.count('/') >= 3 and n.startswith(top + '/')}
      outer = {n.split('/')[0] for n in self.files if n.count('/') == 2}
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


def _folder_split(tree: _Tree, data_config, split: str) -> tuple[str, list[str], dict]:
  """Checks the tree and returns (split dir, class names, {class: files}) for `split`."""
  available = tree.splits()
  where = f'data.path={tree.path!r}' + (f' (inside {tree.root!r})' if tree.root else '')
  train_dir = data_config.train_split
  if train_dir not in available:
    raise ValueError(
        f'{where} has no {train_dir!r} folder of class folders (found: {available or "nothing"}). '
        f'Expected ROOT/{train_dir}/<class>/<image>, optionally inside one top-level folder; fix '
        '--config.data.path or --config.data.train_split.')
  field = split_field(split)
  split_dir = pick_split(data_config[field], available, field, where,
                         allow_fallback=(split == 'eval'))
  by_class = tree.classes(split_dir)
  for name in tree.class_dirs(split_dir):
    if not by_class.get(name):
      raise ValueError(f'{where}: class folder {split_dir}/{name}/ has no image files; '
                       'remove it or add images (every class folder must hold at least one).')
  # Labels index the sorted union of train and this split's classes, so train
  # and eval labels agree even if one split lacks a class.
  class_names = sorted(set(tree.classes(train_dir)) | set(by_class))
  return split_dir, class_names, by_class


def _archive_key(path: str) -> Optional[dict]:
  """Cache identity of an archive from os.stat alone: a warm run never reads it."""
  path = os.path.abspath(os.path.expanduser(path))
  if not (os.path.isfile(path) and _is_archive(path)):
    return None
  st = os.stat(path)
  return {'archive': path, 'mtime_ns': st.st_mtime_ns, 'size': st.st_size}


def _load_folder(data_config, split: str, side: int) -> ImageDataset:
  field = split_field(split)
  stem = os.path.basename(os.path.abspath(os.path.expanduser(data_config.path)))
  for suffix in _ARCHIVE_SUFFIXES:
    stem = stem[:-len(suffix)] if stem.endswith(suffix) else stem
  base_key = {'kind': 'folder', 'side': side, 'train_split': data_config.train_split,
              'split': data_config[field], 'fallback': split == 'eval', 'version': _CACHE_VERSION}
  archive_key = _archive_key(data_config.path)
  if archive_key is not None:  # Archives: look the cache up before listing them.
    path = _cache_path(data_config, {**base_key, **archive_key},
                       f'{stem}-{data_config[field]}-{side}px')
    hit = _read_cache(path)
    if hit is not None:
      images, labels, meta = hit
      return ImageDataset(images, labels, len(meta['class_names']), meta['class_names'])
  decode_splits = None
  if archive_key is not None:
    candidates = {data_config[field]} | (set(_EVAL_FALLBACKS) if split == 'eval' else set())
    decode_splits = {'splits': candidates, 'side': side, 'decode': decode_image,
                     'workers': int(data_config.num_workers)}
    logging.info('Reading %s once: listing it and decoding %s/ at %dx%d with %d threads.',
                 data_config.path, '/, '.join(sorted(candidates)), side, side,
                 data_config.num_workers)
  tree = _Tree(data_config.path, decode_splits)
  split_dir, class_names, by_class = _folder_split(tree, data_config, split)
  names, labels = [], []
  for name in by_class:
    names.extend(by_class[name])
    labels.extend([class_names.index(name)] * len(by_class[name]))
  if archive_key is None:  # Directories: the listing (names, sizes, mtimes) is the key.
    key = {**base_key, 'data': tree.fingerprint(names)}
    path = _cache_path(data_config, key, f'{stem}-{split_dir}-{side}px')
    hit = _read_cache(path)
    if hit is not None:
      return ImageDataset(hit[0], hit[1], len(class_names), class_names)
  decoded = tree.decoded  # Archives: decoded while listing.
  if decoded is None:
    logging.info('Decoding %d images of %s/%s at %dx%d with %d threads.', len(names), tree.path,
                 split_dir, side, side, data_config.num_workers)
    decoded = decode_stream(tree.read(names), side, int(data_config.num_workers), decode_image)
  tree.decoded = None
  images, ok = assemble(decoded, names, side)
  images, labels_arr = _keep_decoded(images, np.asarray(labels, np.int32), ok, names,
                                     f'{tree.path}/{split_dir}')
  _write_cache(path, images, labels_arr, {'class_names': class_names, 'split': split_dir})
  return ImageDataset(images, labels_arr, len(class_names), class_names)


def _keep_decoded(images, labels, ok, names, where):
  """Drops undecodable files, warning once with their count."""
  bad = int((~ok).sum())
  if bad:
    examples = [names[i] for i in np.flatnonzero(~ok)[:3]]
    logging.warning('Skipped %d of %d files in %s that are not readable images '
                    '(truncated, corrupt or another format), e.g. %s.',
                    bad, len(names), where, examples)
  if not ok.any():
    raise ValueError(f'No readable image in {where}: all {len(names)} files failed to decode.')
  if bad:
    images, labels = images[ok], labels[ok]
  return images, labels


# --------------------------------------------------------------------------
# Cache of decoded arrays.


def _cache_path(data_config, key: dict, stem: str) -> str:
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  safe = ''.join(c if c.isalnum() or c in '-_.' else '_' for c in stem)
  return os.path.join(cache_dir(data_config), f'{safe}-{digest}')


def _read_cache(path: str):
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
  except (OSError, ValueError, KeyError) as e:
    logging.warning('Ignoring unreadable cache %s (%s); decoding again.', path, e)
    return None
  logging.info('Loaded %d decoded images from cache %s.images.npy.', len(images), path)
  return images, labels, meta


def _write_cache(path: str, images: np.ndarray, labels: np.ndarray, meta: dict) -> None:
  """Writes the cache; the .json marker comes last, so a partial cache never looks complete.

  Files are written under temporary names and renamed, so concurrent runs
  (several processes of one host) cannot read half-written arrays.
  """
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f'.tmp{os.getpid()}'
    for suffix, array in (('.images.npy', images), ('.labels.npy', labels)):
      with open(path + suffix + tmp, 'wb') as f:
        np.save(f, array)
      os.replace(path + suffix + tmp, path + suffix)
    with open(path + '.json' + tmp, 'w') as f:
      json.dump({**meta, 'count': int(len(images)), 'shape': list(images.shape)}, f)
    os.replace(path + '.json' + tmp, path + '.json')
    logging.info('Cached %d decoded images at %s.images.npy (set data.cache_dir to move it).',
                 len(images), path)
  except OSError as e:
    logging.warning('Could not write the decode cache at %s (%s); continuing without it.', path, e)


# --------------------------------------------------------------------------
# tfds source (TensorFlow is imported only here: the GPU machine has none).


def _load_tfds(data_config, split: str, side: int) -> ImageDataset:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = data_config.get('data_dir', '') or None
  builder = tfds.builder(data_config.name, data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f'tfds dataset data.name={data_config.name!r} is not prepared in '
        f'data.data_dir={data_dir or "(tfds default, ~/tensorflow_datasets)"!r} '
        '(this machine cannot download it). Point --config.data.data_dir at a prepared tfds '
        'directory, or read a local ImageFolder tree/archive with --config.data.path=... '
        '(e.g. ../shared/data/imagenette2-128sq.tgz).')
  field = split_field(split)
  available = list(builder.info.splits.keys())
  wanted = data_config[field]
  # A mocked builder (tfds.testing.mock_data) lists no splits: take the name as is.
  split_name = wanted if not available else pick_split(
      wanted, available, field, f'tfds {data_config.name!r}', allow_fallback=(split == 'eval'))
  label_feature = builder.info.features['label']
  class_names = list(label_feature.names)
  key = {'kind': 'tfds', 'name': data_config.name, 'dir': str(builder.data_dir),
         'version': str(builder.info.version), 'split': split_name, 'side': side,
         'cache': _CACHE_VERSION}
  path = _cache_path(data_config, key, f'tfds-{data_config.name}-{split_name}-{side}px')

  hit = _read_cache(path)
  if hit is not None:
    return ImageDataset(hit[0], hit[1], len(class_names), class_names)
  ds = builder.as_dataset(split=split_name, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()})
  labels = []

  def items():  # Iterated in this thread; decoding runs in the pool.
    for index, example in enumerate(tfds.as_numpy(ds)):
      labels.append(int(example['label']))
      yield index, example['image']

  logging.info('Decoding tfds %s:%s at %dx%d with %d threads.', data_config.name, split_name,
               side, side, data_config.num_workers)
  decoded = decode_stream(items(), side, int(data_config.num_workers), _decode_tfds_image)
  images, ok = assemble(decoded, list(range(len(labels))), side)
  images, labels_arr = _keep_decoded(images, np.asarray(labels, np.int32), ok,
                                     [f'#{i}' for i in range(len(labels))],
                                     f'tfds {data_config.name}:{split_name}')
  _write_cache(path, images, labels_arr, {'class_names': class_names, 'split': split_name})
  return ImageDataset(images, labels_arr, len(class_names), class_names)


def _decode_tfds_image(value, side: int) -> Optional[np.ndarray]:
  """tfds yields encoded bytes (SkipDecoding) or, when mocked, decoded arrays."""
  if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3:
    image = value if value.shape[-1] == 3 else np.repeat(value[..., :1], 3, axis=-1)
    return fit_square(Image.fromarray(image), side)
  return decode_image(bytes(value), side)


# --------------------------------------------------------------------------
# Entry point.


def _load_synthetic(data_config, split: str, side: int) -> ImageDataset:
  n = int(data_config.synthetic_examples)
  rng = np.random.default_rng(0 if split == 'train' else 1)
  images = rng.integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)
  labels = rng.integers(0, data_config.synthetic_classes, size=(n,)).astype(np.int32)
  names = [f'class_{i}' for i in range(data_config.synthetic_classes)]
  return ImageDataset(images, labels, int(data_config.synthetic_classes), names)


def load_split(data_config, split: str) -> ImageDataset:
  """Loads `split` ('train' or 'eval') of the dataset described by `data_config`.

  Returns uint8 images [N, S, S, 3] (S = `image_side`) and int32 labels.
  Raises FileNotFoundError / ValueError naming the config field to fix.
  """
  split_field(split)
  side = image_side(data_config)
  source = resolve_source(data_config)
  if source == 'synthetic':
    return _load_synthetic(data_config, split, side)
  if source == 'folder':
    return _load_folder(data_config, split, side)
  return _load_tfds(data_config, split, side)


# --------------------------------------------------------------------------
# Batches.


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The order of examples in `epoch`: a pure function of (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


@functools.lru_cache(maxsize=4)
def _frozen_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """`epoch_permutation`, computed once per epoch (O(N): 20 ms for ImageNet) and read-only."""
  perm = epoch_permutation(num_examples, seed, epoch)
  perm.setflags(write=False)
  return perm


def train_indices(num_examples: int, global_batch: int, seed: int, step: int) -> np.ndarray:
  """Dataset indices of global batch `step`: positions [b*s', b*(s'+1)) of its epoch."""
  steps_per_epoch = num_examples // global_batch
  epoch, offset = divmod(step, steps_per_epoch)
  perm = _frozen_permutation(num_examples, seed, epoch)
  return perm[offset * global_batch:(offset + 1) * global_batch].copy()


def _local_batch(global_batch: int, process_count: int) -> int:
  if global_batch % process_count:
    raise ValueError(f'batch_size={global_batch} is not divisible by the {process_count} '
                     'processes.')
  return global_batch // process_count


def _prefetch(produce: Callable[[int], dict], start: int, depth: int) -> Iterator[dict]:
  """Runs produce(start), produce(start+1), ... in a thread, `depth` batches ahead.

  numpy's take releases the GIL, so the gather overlaps the train step. The
  thread stops when the iterator is closed or garbage collected.
  """
  out: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def run():
    step = start
    while not stop.is_set():
      try:
        item = (produce(step), None)
      except Exception as e:  # pylint: disable=broad-except
        item = (None, e)
      while not stop.is_set():
        try:
          out.put(item, timeout=0.1)
          break
        except queue.Full:
          pass
      if item[1] is not None:
        return
      step += 1

  thread = threading.Thread(target=run, name='moco_jax-prefetch', daemon=True)
  thread.start()
  try:
    while True:
      batch, error = out.get()
      if error is not None:
        raise error
      yield batch
  finally:
    stop.set()


def train_batches(ds: ImageDataset, *, global_batch: int, seed: int, start_step: int = 0,
                  process_index: int = 0, process_count: int = 1,
                  prefetch: int = 2) -> Iterator[dict]:
  """Yields this process's slice of every global training batch from `start_step` on.

  The ragged tail of each epoch is dropped, so step s always reads the same
  examples: those at positions [b*s', b*(s'+1)) of epoch e's permutation, and
  a run resumed at `start_step` continues the uninterrupted sequence exactly.
  Batches are {'image': uint8 [b, S, S, 3], 'label': int32 [b]} with
  b = global_batch / process_count; `prefetch` > 0 gathers them in a thread.
  """
  num = len(ds)
  if num // global_batch == 0:
    raise ValueError(f'batch_size={global_batch} is larger than the dataset ({num} examples).')
  local = _local_batch(global_batch, process_count)
  images, labels = ds.images, ds.labels

  def produce(step):
    idx = train_indices(num, global_batch, seed, step)
    idx = idx[process_index * local:(process_index + 1) * local]
    return {'image': np.take(images, idx, axis=0), 'label': np.take(labels, idx, axis=0)}

  if prefetch > 0:
    yield from _prefetch(produce, start_step, prefetch)
  else:
    step = start_step
    while True:
      yield produce(step)
      step += 1


def eval_batches(ds: ImageDataset, *, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
  """Yields every example exactly once, in dataset order, as fixed-shape batches.

  The last global batch is padded (with example 0) to `global_batch`, and
  'mask' (bool) is False on padding, so evaluation compiles one shape and
  metrics weight by the mask.
  """
  num = len(ds)
  local = _local_batch(global_batch, process_count)
  for start in range(0, num, global_batch):
    first = start + process_index * local
    positions = np.arange(first, first + local)
    mask = positions < num
    idx = np.where(mask, positions, 0)
    yield {'image': np.take(ds.images, idx, axis=0), 'label': np.take(ds.labels, idx, axis=0),
           'mask': mask}
