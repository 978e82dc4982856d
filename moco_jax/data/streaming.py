"""Streaming input: train splits too large to decode into host memory.

Small splits keep the decoded in-memory path (`load_split`, optionally
`data.on_device`): one decode per image per run, then only gathers. A split
whose decoded size (N x S x S x 3 bytes) exceeds `data.max_in_memory_gb`
(default: 25% of the host's RAM) is streamed instead (`plan_train_input`
decides, and says why in the log):

  * Every step, each JAX process reads and decodes only its own 1/P slice of
    the global batch: the examples of step s are `train_indices(N, B, seed, s)`
    (the in-memory path's order), sliced by process.
  * The host decodes each image once per step, at reduced size where the
    crops allow it (Pillow's JPEG `draft`: a DCT-domain 1/2, 1/4 or 1/8
    decode), and cuts MoCo's two RandomResizedCrop views from the WHOLE
    original image, each resized to `image_size`: the batch is uint8
    [b, 2, image_size, image_size, 3]. The crop boxes are sampled exactly as
    torchvision samples them (`crop_box`, a NumPy twin of
    `image_ops.crop_box_from_uniforms`) from uniforms that are a pure function
    of (seed, step, position in the global batch). Colour jitter, grayscale,
    blur, flip and normalisation stay on the accelerator
    (`augment.two_views_from_crops`).
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
import io
import json
import math
import os
import signal
from typing import Iterator, Optional

from absl import flags
from absl import logging
import numpy as np
from PIL import Image

from moco_jax import errors
from moco_jax.data import batching
from moco_jax.data import cache
from moco_jax.data import dataset
from moco_jax.data import decode
from moco_jax.data import folder
from moco_jax.data import sources
from moco_jax.data import tfds_source

# Bump when the index format changes.
_INDEX_VERSION = 1
# Uniforms one RandomResizedCrop consumes (as image_ops.CROP_UNIFORMS): 10 area
# draws, 10 log-ratio draws, top, left.
CROP_TRIES = 10
CROP_UNIFORMS = 2 * CROP_TRIES + 2
# How many substitutes are tried for an unreadable example before giving up.
_MAX_SUBSTITUTES = 16
# A JPEG is decoded at reduced DCT scale only while both crop boxes keep at
# least this many times the output side: the final antialiased resize then
# still filters >= 2 source pixels per output pixel (measured: mean |diff| vs
# a full decode <= ~1.5/255; at 1x the DC-only 1/8 decode aliases, ~2.5/255).
_DRAFT_MARGIN = 2
_DECODE_ERRORS = decode.DECODE_ERRORS


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
    tmp = f'.tmp{os.getpid()}'
    for suffix, array in (('.names.npy', encoded), ('.labels.npy', np.asarray(labels, np.int32))):
      with open(index_path + suffix + tmp, 'wb') as f:
        np.save(f, array)
      os.replace(index_path + suffix + tmp, index_path + suffix)
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
  """(prepared builder, train split name); the in-memory path's errors otherwise."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = data_config.get('data_dir', '') or None
  try:
    builder = tfds.builder(data_config.name, data_dir=data_dir)
  except ValueError as e:  # One line, not the list of every tfds dataset.
    raise errors.DataError(tfds_source.unknown_dataset_message(tfds, data_config.name, e)) from e
  if not builder.is_prepared():
    raise errors.DataNotFoundError(
        f'tfds dataset data.name={data_config.name!r} is not prepared in '
        f'data.data_dir={data_dir or "(tfds default, ~/tensorflow_datasets)"!r} '
        '(this machine cannot download it). Point --config.data.data_dir at a prepared tfds '
        'directory, or read a local ImageFolder directory with --config.data.path=DIR.')
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
    with open(path + f'.tmp{os.getpid()}', 'w') as f:
      json.dump(value, f)
    os.replace(path + f'.tmp{os.getpid()}', path)
  except OSError as e:
    logging.warning('Could not write %s (%s); continuing without it.', path, e)


# --------------------------------------------------------------------------
# Crops on the host.


def crop_uniforms(seed: int, step: int, position: int) -> np.ndarray:
  """float32 [2, CROP_UNIFORMS]: both views' crop randomness at (seed, step, global position)."""
  rng = np.random.default_rng([seed, step, position, 0x63726F70])  # 'crop'
  return rng.random((2, CROP_UNIFORMS), dtype=np.float32)


def crop_box(u: np.ndarray, height: int, width: int, scale, ratio) -> np.ndarray:
  """RandomResizedCrop's (top, left, h, w) from CROP_UNIFORMS uniforms, as torchvision samples it.

  The NumPy twin of `image_ops.crop_box_from_uniforms` (float32 arithmetic, so
  both give the same box from the same uniforms): up to 10 (area, log-aspect)
  draws, the first box that fits wins, else the largest centred box with a
  clamped ratio; the offsets are uniform over the valid positions.
  """
  u = np.asarray(u, np.float32)
  u_area, u_ratio = u[:CROP_TRIES], u[CROP_TRIES:2 * CROP_TRIES]
  u_top, u_left = u[2 * CROP_TRIES], u[2 * CROP_TRIES + 1]
  f32 = np.float32
  area = f32(height * width) * (f32(scale[0]) + f32(scale[1] - scale[0]) * u_area)
  lo, hi = f32(math.log(ratio[0])), f32(math.log(ratio[1]))
  aspect = np.exp(lo + (hi - lo) * u_ratio)
  w = np.round(np.sqrt(area * aspect))
  h = np.round(np.sqrt(area / aspect))
  valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  if valid.any():
    first = int(np.argmax(valid))
    w, h = w[first], h[first]
    top = min(np.floor(u_top * f32(height - h + 1)), f32(height - h))
    left = min(np.floor(u_left * f32(width - w + 1)), f32(width - w))
    return np.array([top, left, h, w], np.int64)
  in_ratio = width / height
  if in_ratio < ratio[0]:
    fw, fh = width, round(width / ratio[0])
  elif in_ratio > ratio[1]:
    fw, fh = round(height * ratio[1]), height
  else:
    fw, fh = width, height
  return np.array([(height - fh) // 2, (width - fw) // 2, fh, fw], np.int64)


def two_crops(encoded, u: np.ndarray, size: int, scale, ratio) -> Optional[np.ndarray]:
  """Decodes one image and cuts both RandomResizedCrop views: uint8 [2, size, size, 3].

  The boxes are sampled over the whole original image. A JPEG is decoded at
  the smallest DCT scale (1, 1/2, 1/4, 1/8) that still leaves both boxes at
  least 2 x `size` px on their shorter side (`draft`), so a crop is never
  upsampled from a reduced decode and is still resized with antialiasing.
  Each box is then resized (bilinear, antialiased, as torchvision's PIL
  path) straight from the decoded image.
  Returns None for an unreadable image.

  Args:
    encoded: the file's bytes, or a decoded uint8 array [H, W, C] (mocked tfds).
    u: float32 [2, CROP_UNIFORMS] (`crop_uniforms`).
    size: output side (data.image_size).
    scale, ratio: RandomResizedCrop's ranges (aug.crop_scale, aug.crop_ratio).
  """
  try:
    if isinstance(encoded, np.ndarray) and encoded.dtype == np.uint8 and encoded.ndim == 3:
      image = Image.fromarray(encoded if encoded.shape[-1] == 3 else encoded[..., 0])
    else:
      image = Image.open(io.BytesIO(bytes(encoded)))
    with image:
      width, height = image.size
      boxes = [crop_box(u[v], height, width, scale, ratio) for v in range(2)]
      shortest = min(min(int(b[2]), int(b[3])) for b in boxes)
      keep = _DRAFT_MARGIN * size  # Shorter box side kept after a reduced decode.
      if image.format == 'JPEG' and shortest >= 2 * keep:
        image.draft('RGB', (max(1, width * keep // shortest), max(1, height * keep // shortest)))
      image.load()
      if image.mode != 'RGB':
        image = image.convert('RGB')
      sx, sy = image.width / width, image.height / height
      out = np.empty((2, size, size, 3), np.uint8)
      for v, (top, left, h, w) in enumerate(boxes):
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        out[v] = np.asarray(image.resize((size, size), Image.BILINEAR, box=box))
      return out
  except _DECODE_ERRORS:
    return None


# --------------------------------------------------------------------------
# The loader.


def substitute_index(num_examples: int, seed: int, index: int, attempt: int) -> int:
  """The example read instead of unreadable `index` on its `attempt`-th retry (deterministic)."""
  return int(np.random.default_rng([seed, index, attempt, 0x737562]).integers(num_examples))


class LoadExample:
  """Flat position i of this process's stream -> its example with both crops.

  i = step * local + j reads position process_index * local + j of the global
  batch of `step`: example `train_indices(N, B, seed, step)[position]`.
  Picklable (grain sends it to worker processes).
  """

  def __init__(self, source: StreamSource, *, global_batch: int, seed: int, process_index: int,
               process_count: int, image_size: int, crop_scale, crop_ratio):
    self.source = source
    self.num = len(source)
    self.global_batch, self.seed = global_batch, seed
    self.local = global_batch // process_count
    self.offset = process_index * self.local
    self.image_size = image_size
    self.scale, self.ratio = tuple(crop_scale), tuple(crop_ratio)

  def __call__(self, i: int) -> dict:
    step, j = divmod(int(i), self.local)
    position = self.offset + j
    index = int(batching.train_indices(self.num, self.global_batch, self.seed, step)[position])
    u = crop_uniforms(self.seed, step, position)
    candidate = index
    for attempt in range(_MAX_SUBSTITUTES + 1):
      if attempt:
        candidate = substitute_index(self.num, self.seed, index, attempt)
      try:
        encoded = self.source.read(candidate)
      except OSError:
        encoded = b''
      crops = two_crops(encoded, u, self.image_size, self.scale, self.ratio)
      if crops is not None:
        if attempt:
          logging.warning('Unreadable image %s (not a readable image file): read %s instead.',
                          self.source.name(index), self.source.name(candidate))
        return {'image': crops, 'label': np.int32(self.source.label(candidate)),
                'index': np.int64(candidate), 'skipped': np.int32(attempt)}
    raise errors.DataError(f'{_MAX_SUBSTITUTES + 1} examples in a row failed to decode in '
                     f'{self.source.where} (first: {self.source.name(index)}): is it an image '
                     'folder?')


def train_batches(source: StreamSource, *, global_batch: int, seed: int, image_size: int,
                  crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), start_step: int = 0,
                  end_step: Optional[int] = None, process_index: int = 0,
                  process_count: int = 1, num_threads: int = 4,
                  num_processes: int = 0, prefetch: int = 2) -> Iterator[dict]:
  """Yields this process's slice of every global batch from `start_step` on, streamed.

  Batches are {'image': uint8 [b, 2, image_size, image_size, 3] (both
  views' crops), 'label': int32 [b], 'index': int64 [b] (dataset index
  read), 'skipped': int32 [b] (unreadable files replaced)}, b = global_batch /
  process_count. Step s holds the examples `train_indices(N, global_batch,
  seed, s)` (as the in-memory path), so a run resumed at `start_step`
  continues the uninterrupted sequence exactly.

  Args:
    num_threads: grain read threads (per process); each reads whole batches.
    num_processes: grain worker processes (0: threads in this process only).
    prefetch: batches buffered ahead (memory: about (num_threads + prefetch)
      batches in flight per worker process, or in this process without).
  """
  import grain  # pylint: disable=g-import-not-at-top
  num = len(source)
  if num // global_batch == 0:
    raise ValueError(f'batch_size={global_batch} is larger than the dataset ({num} examples).')
  local = batching._local_batch(global_batch, process_count)  # pylint: disable=protected-access
  end_step = end_step if end_step is not None else 2**40
  load = LoadExample(source, global_batch=global_batch, seed=seed, process_index=process_index,
                     process_count=process_count, image_size=image_size, crop_scale=crop_scale,
                     crop_ratio=crop_ratio)
  ds = grain.MapDataset.range(start_step * local, end_step * local).map(load)
  ds = ds.batch(local, drop_remainder=True)
  threads = max(1, int(num_threads))
  # In flight: `threads` batches being read, plus `prefetch` ready ones (in the
  # worker processes' shared-memory queues when there are workers).
  buffered = threads if num_processes > 0 else threads + max(0, prefetch)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffered))
  if num_processes > 0:
    if not flags.FLAGS.is_parsed():  # Grain's workers read its absl flags (pytest, notebooks).
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(num_processes),
                                                     per_worker_buffer_size=max(1, prefetch)),
                        worker_init_fn=_ignore_ctrl_c)
  return iter(it)


def _ignore_ctrl_c(worker_index: int, worker_count: int):
  """In each grain worker: a terminal's Ctrl-C reaches the whole process group, but
  stopping is the train loop's job (`moco_jax.stopping`: finish the step, save, exit 130),
  so workers must not die of it with a KeyboardInterrupt traceback."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def loader_workers(data_config) -> tuple[int, int]:
  """(worker processes, threads per process) of the streaming loader.

  data.stream_processes (-1: one per core but one, for the train loop) worker
  processes, each reading with one thread; without worker processes,
  data.num_workers threads in this process (Pillow releases the GIL while
  decoding and resizing, the Python around it does not).
  """
  processes = int(data_config.get('stream_processes', -1))
  if processes < 0:
    processes = max(1, (os.cpu_count() or 2) - 1)
  threads = 1 if processes > 0 else max(1, int(data_config.num_workers))
  return processes, threads
