"""The packed source: a directory of ArrayRecord shards written by `--mode=pack`, read at random.

A packed directory (`moco_jax.data.pack` writes it) holds, per split, shards
`<split>-<k>-of-<n>.array_record` (one record per image: label, source file
name and the image re-encoded as JPEG with its short side at most
`data.pack_side`), `<split>.labels.npy` and one `manifest.json` that names
the source, the splits, their counts, the classes and a SHA-256 per file. The
manifest is written last, so its presence is what makes a directory packed
(`is_packed`: `data.path=DIR` then reads it).

Records are read through grain's `ArrayRecordDataSource` (one record per
chunk: a random read is one seek); each record carries a CRC-32 of its bytes,
so a corrupt record is found when it is read, not only by a full checksum
pass. Opening a split checks every shard's size against the manifest (a
truncated or missing shard is refused at once); loading a split into memory
reads every byte anyway and checks the SHA-256 of each shard too.
"""

import concurrent.futures
import hashlib
import json
import os
import struct
import zlib
from typing import Optional

from absl import logging
import numpy as np

from moco_jax.core import errors
from moco_jax.core import files
from moco_jax.data import cache
from moco_jax.data import dataset
from moco_jax.data import decode
from moco_jax.data import spec as spec_lib
from moco_jax.data.dataset import ImageDataset, StreamSource
from moco_jax.data.spec import DataSpec

MANIFEST = spec_lib.PACKED_MANIFEST
FORMAT = 'moco_jax-packed'
FORMAT_VERSION = 1
# Record: magic, CRC-32 of what follows the header, label, name length; then name, JPEG bytes.
_MAGIC = b'MJP1'
_HEADER = struct.Struct('<4sIiH')


def encode_record(label: int, name: str, image: bytes) -> bytes:
  """One record's bytes: header (magic, CRC-32, label, name length), name, image bytes."""
  name_bytes = name.encode('utf-8', 'surrogateescape')[:65535]
  body = name_bytes + image
  return _HEADER.pack(_MAGIC, zlib.crc32(body), int(label), len(name_bytes)) + body


def decode_record(record: bytes) -> tuple[int, str, bytes]:
  """(label, name, image bytes) of a record; ValueError if it is not one or its CRC is wrong."""
  if len(record) < _HEADER.size:
    raise ValueError('record shorter than its header')
  magic, crc, label, name_len = _HEADER.unpack_from(record)
  body = memoryview(record)[_HEADER.size:]
  if magic != _MAGIC or zlib.crc32(body) != crc or name_len > len(body):
    raise ValueError('record header or CRC-32 does not match its bytes')
  return label, bytes(body[:name_len]).decode('utf-8', 'surrogateescape'), bytes(body[name_len:])


def is_packed(path: str) -> bool:
  """Whether `path` is a packed directory (it holds a manifest.json)."""
  path = os.path.abspath(os.path.expanduser(path or ''))
  return bool(path) and os.path.isfile(os.path.join(path, MANIFEST))


def _repack_hint(root: str, manifest: Optional[dict] = None) -> str:
  source = (manifest or {}).get('source', {}).get('path') if isinstance(manifest, dict) else None
  if source:
    return (f'pack it again: python main.py --mode=pack --config=CONFIG '
            f'--config.data.path={source} --workdir={root} (into an emptied directory)')
  return 'pack the source again with --mode=pack into an empty directory'


def read_manifest(root: str) -> dict:
  """The manifest of packed directory `root`, checked for the fields readers use."""
  root = os.path.abspath(os.path.expanduser(root))
  path = os.path.join(root, MANIFEST)
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise errors.DataError(f'{path} is not a readable manifest ({type(e).__name__}: {e}); '
                           f'{_repack_hint(root)}.') from e
  try:
    if manifest['format'] != FORMAT or manifest['version'] != FORMAT_VERSION:
      raise ValueError(f'format {manifest.get("format")!r} version {manifest.get("version")!r}, '
                       f'expected {FORMAT!r} version {FORMAT_VERSION}')
    if not manifest['class_names'] or not isinstance(manifest['class_names'], list):
      raise ValueError('no class_names')
    for name, split in manifest['splits'].items():
      counts = [int(shard['count']) for shard in split['shards']]
      if sum(counts) != int(split['count']):
        raise ValueError(f'split {name!r}: shard counts add up to {sum(counts)}, not '
                         f'{split["count"]}')
      for shard in split['shards']:
        shard['file'], shard['bytes'], shard['sha256']  # pylint: disable=pointless-statement
      split['labels']['file'], split['labels']['sha256']  # pylint: disable=pointless-statement
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise errors.DataError(f'{path} does not match the packed format ({type(e).__name__}: {e}); '
                           f'{_repack_hint(root, manifest)}.') from e
  return manifest


def split_name(manifest: dict, spec: DataSpec, which: str, root: str) -> str:
  """The packed split that `which` ('train' or 'eval') reads, with the eval fallbacks."""
  field = spec_lib.split_field(which)
  return dataset.pick_split(spec.split_name(which), list(manifest['splits']), field,
                            f'packed data.path={root!r}', allow_fallback=(which == 'eval'))


class PackedReader(StreamSource):
  """One split of a packed directory: grain's ArrayRecordDataSource over its shards.

  Pickles as its paths only (grain worker processes open their own readers);
  labels come from `<split>.labels.npy`, mapped read-only.
  """

  def __init__(self, root: str, split: str, manifest: dict):
    entry = manifest['splits'][split]
    self.root, self.split = root, split
    self.paths = [os.path.join(root, shard['file']) for shard in entry['shards']]
    self.labels_path = os.path.join(root, entry['labels']['file'])
    self.count = int(entry['count'])
    self.class_names = list(entry.get('class_names') or manifest['class_names'])
    self.where = f'{root} (packed split {split!r})'
    self.content_sha256 = hashlib.sha256(json.dumps(
        [entry['labels']['sha256']] + [s['sha256'] for s in entry['shards']]).encode()).hexdigest()
    self._reader = self._labels = None

  def __getstate__(self):
    return {**self.__dict__, '_reader': None, '_labels': None}

  def _open(self):
    if self._reader is None:
      import grain.python as grain  # pylint: disable=g-import-not-at-top
      try:
        self._reader = grain.ArrayRecordDataSource(self.paths)
      except RuntimeError as e:
        raise errors.DataError(f'A shard of {self.where} cannot be opened ({_first(e)}); '
                               f'{_repack_hint(self.root)}.') from e
      self._labels = np.load(self.labels_path, mmap_mode='r')

  def __len__(self) -> int:
    return self.count

  def label(self, index: int) -> int:
    self._open()
    return int(self._labels[index])

  def record(self, index: int) -> tuple[int, str, bytes]:
    self._open()
    try:
      return decode_record(self._reader[index])
    except (RuntimeError, ValueError) as e:
      raise errors.DataError(f'Record {index} of {self.where} is corrupt ({_first(e)}) in '
                             f'{self._shard_of(index)}; {_repack_hint(self.root)}.') from e

  def _shard_of(self, index: int) -> str:
    manifest = read_manifest(self.root)
    for shard in manifest['splits'][self.split]['shards']:
      if index < int(shard['count']):
        return os.path.join(self.root, shard['file'])
      index -= int(shard['count'])
    return self.root

  def labels_array(self) -> np.ndarray:
    self._open()
    return np.asarray(self._labels)

  def name(self, index: int) -> str:
    return self.record(index)[1]

  def fingerprint(self) -> dict:
    """Its files' checksums (from the manifest) name its content."""
    return {'count': len(self), 'sha256': self.content_sha256, 'where': self.where}

  def read(self, index: int) -> bytes:
    return self.record(index)[2]


def _first(error) -> str:
  text = str(error).strip().splitlines()
  return text[0][:200] if text else type(error).__name__


def check_files(root: str, split: str, manifest: dict, checksums: bool):
  """Every file of `split` is there with its size (and, with `checksums`, its SHA-256)."""
  entry = manifest['splits'][split]
  for item in entry['shards'] + [entry['labels']]:
    path = os.path.join(root, item['file'])
    try:
      size = os.path.getsize(path)
    except OSError as e:
      raise errors.DataError(f'{path} is missing ({e.strerror}); it is listed in '
                             f'{os.path.join(root, MANIFEST)}: {_repack_hint(root, manifest)}.'
                             ) from e
    if 'bytes' in item and size != int(item['bytes']):
      raise errors.DataError(
          f'{path} is truncated or was changed: {size} bytes, the manifest says {item["bytes"]}; '
          f'{_repack_hint(root, manifest)}.')
    if checksums and files.sha256_of(path) != item['sha256']:
      raise errors.DataError(f'{path} is corrupt: its SHA-256 does not match '
                             f'{os.path.join(root, MANIFEST)}; {_repack_hint(root, manifest)}.')


def open_packed_reader(spec: DataSpec, which: str = 'train') -> PackedReader:
  """`which` split of the packed directory at `data.path` (shard sizes checked)."""
  root = spec.path
  manifest = read_manifest(root)
  split = split_name(manifest, spec, which, root)
  check_files(root, split, manifest, checksums=False)
  labels = np.load(os.path.join(root, manifest['splits'][split]['labels']['file']), mmap_mode='r')
  if labels.shape != (int(manifest['splits'][split]['count']),):
    raise errors.DataError(f'{root}: {split}.labels.npy holds {labels.shape} labels, the manifest '
                           f'counts {manifest["splits"][split]["count"]}; '
                           f'{_repack_hint(root, manifest)}.')
  return PackedReader(root, split, manifest)


def load_packed(spec: DataSpec, which: str) -> ImageDataset:
  """`which` split decoded into memory at S = `spec.side` (the folder's decode), cached by checksums."""
  root, side = spec.path, spec.side
  manifest = read_manifest(root)
  split = split_name(manifest, spec, which, root)
  entry = manifest['splits'][split]
  key = {'kind': 'packed', 'side': side, 'version': cache.CACHE_VERSION,
         'files': [s['sha256'] for s in entry['shards']] + [entry['labels']['sha256']]}
  path = cache.cache_path(spec.cache_dir, key, f'{os.path.basename(root)}-{split}-{side}px')
  hit = cache.read_cache(path)
  source = PackedReader(root, split, manifest)
  if hit is not None:
    return ImageDataset(hit[0], hit[1], len(source.class_names), source.class_names)
  check_files(root, split, manifest, checksums=True)
  logging.info('Decoding %d images of %s at %dx%d with %d threads.', len(source), source.where,
               side, side, spec.num_workers)
  # Decoded straight into the split's array (not a dict of arrays assembled after, as
  # `dataset.decoded_split` does for sources that arrive out of order): one copy of the split
  # in memory at the peak, not two.
  n = len(source)
  images, ok = np.zeros((n, side, side, 3), np.uint8), np.zeros((n,), bool)

  def work(start):
    for i in range(start, min(start + 64, n)):
      array = decode.decode_image(source.read(i), side)
      if array is not None:
        images[i], ok[i] = array, True

  with concurrent.futures.ThreadPoolExecutor(max(1, spec.num_workers)) as pool:
    for future in [pool.submit(work, start) for start in range(0, n, 64)]:
      future.result()
  labels = np.asarray(source.labels_array(), np.int32)
  images, labels = decode.keep_decoded(images, labels, ok, [source.name(i) for i in range(n)]
                                       if not ok.all() else [], source.where)
  cache.write_cache(path, images, labels, {'class_names': source.class_names, 'split': split})
  return ImageDataset(images, labels, len(source.class_names), source.class_names)
