"""`--mode=pack`: any source's train and eval splits as ArrayRecord shards + a manifest.

  python main.py --mode=pack --config=CONFIG --config.data.path=SOURCE --workdir=OUT

SOURCE is whatever `data.path` (or a tfds `data.name`) reads: an ImageFolder
directory, a tar archive of one, or a prepared tfds dataset. Each image is
stored once, in the source's order, as a JPEG whose short side is at most
`data.pack_side`: larger images are decoded (at the reduced DCT scale that
still covers the target), resized (bicubic, antialiased) and re-encoded at
quality 90 with 4:2:0 chroma (FFCV's default); a JPEG that is already small enough is
kept byte for byte (a second lossy generation would only lose). Unreadable
images are dropped and counted once per split, as the in-memory path does.

Reliability, because a pack of ImageNet takes hours:
  * Every file is written under a temporary name and renamed; the manifest
    (`packed.MANIFEST`) is written last, so a directory is only ever read as
    packed once it is complete.
  * Shard k of a split always holds the same source positions
    [k * SHARD_IMAGES, (k + 1) * SHARD_IMAGES): a stopped pack, rerun with the
    same command, verifies each finished shard by its SHA-256 (kept in
    OUT/.pack_state/) and writes only the rest.
  * OUT must be empty, or a stopped pack of the same source and settings:
    anything else is refused before anything is written.
  * A failed write (a full disk) removes its temporary file, keeps every
    finished shard and says how to resume.
The reader is `moco_jax.data.packed`.
"""

import concurrent.futures
import errno
import hashlib
import io
import json
import os
import shutil
import time
from typing import Callable, Optional

from absl import logging
import numpy as np
from PIL import Image

from moco_jax.core import errors
from moco_jax.core import files
from moco_jax.data import dataset
from moco_jax.data import decode
from moco_jax.data import folder
from moco_jax.data import packed
from moco_jax.data import sources
from moco_jax.data import spec as spec_lib
from moco_jax.data import tfds_source
from moco_jax.data.spec import DataSpec

SHARD_IMAGES = 1024  # Records per shard: ~30-50 MB at 256 px; the unit of resume.
# 90, not 95: a third fewer bytes, and the decode, which is the host's whole work on a packed
# copy, is faster by as much (docs/benchmarks.md, issue 29).
QUALITY = 90
# 4:2:0 chroma, as nearly every source photo (ImageNet's) already is: it decodes ~1.8x faster
# than 4:4:4 at 256 px (docs/benchmarks.md), and the host's decode is what packing speeds up.
SUBSAMPLING = 2
STATE_DIR = '.pack_state'
_OPTIONS = 'group_size:1,uncompressed'  # One record per chunk: a random read is one seek.


def target_size(width: int, height: int, side: int) -> tuple[int, int]:
  """(w, h) with the short side resized to `side`; unchanged when it is already <= side."""
  short = min(width, height)
  if short <= side:
    return width, height
  scale = side / short
  return max(1, round(width * scale)), max(1, round(height * scale))


def reencode(value, side: int) -> Optional[bytes]:
  """The record's image bytes for one source image, or None if it is not a readable image."""
  try:
    raw = None if isinstance(value, np.ndarray) else bytes(value)
    image, (width, height) = decode.load_rgb(
        value, reduce_to=lambda w, h: target_size(w, h, side))
    size = target_size(width, height, side)
    if raw is not None and size == (width, height) and raw[:3] == b'\xff\xd8\xff':
      return raw  # A small enough JPEG: its own bytes decode exactly as the source's.
    if image.size != size:
      image = image.resize(size, Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format='JPEG', quality=QUALITY, subsampling=SUBSAMPLING)
    return buf.getvalue()
  except decode.DECODE_ERRORS:
    return None


class SplitInput:
  """One source split to pack: count, label(i), name(i), image(i) (record bytes or None)."""

  def __init__(self, split: str, class_names: list, labels: list, names: list,
               image: Callable[[int], Optional[bytes]], where: str):
    self.split, self.class_names, self.where = split, class_names, where
    self.labels, self.names, self.image = labels, names, image

  def __len__(self) -> int:
    return len(self.labels)

  def digest(self) -> str:
    """The split's identity: its names and labels in order."""
    h = hashlib.sha256()
    for name, label in zip(self.names, self.labels):
      h.update(f'{name}\t{label}\n'.encode('utf-8', 'surrogateescape'))
    return h.hexdigest()


def _stream_input(source, split: str, side: int) -> SplitInput:
  """A split of a random-access source (folder directory, tfds array_record)."""

  def image(i):
    try:
      return reencode(source.read(i), side)
    except OSError:
      return None

  n = len(source)
  return SplitInput(split, list(source.class_names), [source.label(i) for i in range(n)],
                    [source.name(i) for i in range(n)], image, source.where)


def _archive_inputs(spec: DataSpec, side: int) -> dict:
  """Both splits of an archive, re-encoded during the one pass that lists it (held as JPEGs)."""
  wanted = {spec.train_split, spec.eval_split} | set(spec_lib.EVAL_FALLBACKS)
  logging.info('Reading %s once: listing it and re-encoding %s/ at <= %d px with %d threads.',
               spec.path, '/, '.join(sorted(wanted)), side, spec.num_workers)
  tree = folder.Tree(spec.path, {'splits': wanted, 'side': side, 'decode': reencode,
                                 'workers': spec.num_workers})
  inputs = {}
  for which in ('train', 'eval'):
    try:
      split_dir, class_names, names, labels = folder.labelled_files(tree, spec, which)
    except errors.DataError as e:
      if _no_eval_split(which, e):
        break
      raise
    inputs[which] = SplitInput(split_dir, class_names, labels, names,
                               lambda i, names=names: tree.decoded.pop(names[i], None),
                               f'{tree.path}/{split_dir}')
  return inputs


def _inputs(source: dataset.Source, side: int) -> dict:
  """{'train': SplitInput, 'eval': SplitInput} of the configured source."""
  spec = source.spec
  if spec.kind == 'archive':
    return _archive_inputs(spec, side)
  inputs = {}
  for which in ('train', 'eval'):
    try:
      reader = source.open(which)
      if spec.kind == 'folder':
        split = os.path.basename(reader.where)
      else:
        split = tfds_source.builder_and_split(spec, which)[1]
    except errors.DataError as e:
      if _no_eval_split(which, e):
        break
      raise
    inputs[which] = _stream_input(reader, split, side)
  return inputs


def _no_eval_split(which: str, error) -> bool:
  """Whether `error` says the source has no eval split: then only train is packed (logged)."""
  if which != 'eval' or 'is not in' not in str(error):
    return False
  logging.warning('Packing the train split only: %s Evaluations of the packed copy will say so '
                  'too.', error)
  return True


def _identity(spec: DataSpec) -> dict:
  """What a resumed pack must share with the stopped one (before listing the source)."""
  if spec.kind in ('folder', 'archive'):
    where = {'path': spec.path}
    if spec.kind == 'archive':
      st = os.stat(spec.path)
      where.update(mtime_ns=st.st_mtime_ns, size=st.st_size)
  else:
    where = {'tfds': spec.name, 'data_dir': spec.data_dir}
  return {'kind': 'tfds' if spec.kind == 'tfds' else 'folder', **where,
          'train_split': spec.train_split, 'eval_split': spec.eval_split,
          'pack_side': spec.pack_side, 'quality': QUALITY, 'shard_images': SHARD_IMAGES,
          'version': packed.FORMAT_VERSION}


def _write_file(path: str, write: Callable, binary: bool = True) -> None:
  """write(f) into path.tmp, then rename; the temporary file never outlives a failure."""
  tmp = f'{path}.tmp'
  try:
    with open(tmp, 'wb' if binary else 'w') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _write_json(path: str, value) -> None:
  _write_file(path, lambda f: f.write(json.dumps(value, indent=1)), binary=False)


def _write_shard(path: str, records: list) -> None:
  """The records into an ArrayRecord file at path (through path.tmp and a rename)."""
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top
  tmp = f'{path}.tmp'
  try:
    writer = ArrayRecordWriter(tmp, _OPTIONS)
    if not writer.ok():
      raise OSError(errno.EIO, f'cannot open {tmp} for writing')
    for record in records:
      writer.write(record)
    writer.close()
    with open(tmp, 'rb+') as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def check_out(out: str, identity: dict) -> str:
  """'new', 'resume' or 'done' for pack directory `out`; refuses any other non-empty directory."""
  if not os.path.exists(out):
    return 'new'
  if not os.path.isdir(out):
    raise errors.DataError(f'--workdir={out} is a file: pack into a new or empty directory.')
  entries = sorted(os.listdir(out))
  if not entries:
    return 'new'
  manifest = _read_json(os.path.join(out, packed.MANIFEST))
  if isinstance(manifest, dict) and manifest.get('identity') == identity:
    return 'done'
  stopped = _read_json(os.path.join(out, STATE_DIR, 'identity.json'))
  if stopped == identity:
    return 'resume'
  why = ('it holds a pack of another source or with other settings' if manifest or stopped
         else f'it holds {len(entries)} entries, e.g. {entries[:3]}')
  raise errors.DataError(f'--workdir={out} is not empty and is not a stopped pack of this source '
                         f'({why}): pack into a new or empty directory (nothing was written).')


class _Progress:
  """Images packed so far, their rate and the ETA, one log line per shard."""

  def __init__(self, total: int):
    self.total, self.done, self.new, self.start = total, 0, 0, time.time()

  def add(self, count: int, written: bool, what: str):
    self.done += count
    self.new += count if written else 0
    elapsed = max(time.time() - self.start, 1e-9)
    rate = self.new / elapsed
    eta = (self.total - self.done) / rate if rate > 0 else float('nan')
    logging.info('Pack: %s; %d / %d images (%.0f%%), %.0f img/s, ETA %s.', what, self.done,
                 self.total, 100 * self.done / max(self.total, 1), rate,
                 '?' if eta != eta else time.strftime('%H:%M:%S', time.gmtime(eta)))


def _pack_split(out: str, which: str, inp: SplitInput, workers: int, progress: _Progress) -> dict:
  """Writes (or keeps, verified) every shard of one split; returns its manifest entry."""
  n = len(inp)
  num_shards = max(1, -(-n // SHARD_IMAGES))
  shards, labels, skipped, examples = [], [], 0, []
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    for k in range(num_shards):
      name = f'{inp.split}-{k:05d}-of-{num_shards:05d}.array_record'
      path, state_path = os.path.join(out, name), os.path.join(out, STATE_DIR, name + '.json')
      positions = range(k * SHARD_IMAGES, min((k + 1) * SHARD_IMAGES, n))
      state = _read_json(state_path)
      kept = (isinstance(state, dict) and os.path.exists(path)
              and state.get('positions') == [positions.start, positions.stop]
              and files.sha256_of(path) == state.get('sha256'))
      if not kept:
        images = list(pool.map(inp.image, positions))
        records = [packed.encode_record(inp.labels[i], inp.names[i], image)
                   for i, image in zip(positions, images) if image is not None]
        bad = [inp.names[i] for i, image in zip(positions, images) if image is None]
        try:
          _write_shard(path, records)
        except (OSError, RuntimeError) as e:
          if os.path.exists(path + '.tmp'):
            os.remove(path + '.tmp')
          raise _write_error(out, path, e) from e
        state = {'positions': [positions.start, positions.stop], 'sha256': files.sha256_of(path),
                 'bytes': os.path.getsize(path), 'count': len(records),
                 'labels': [inp.labels[i] for i, image in zip(positions, images) if image is not None],
                 'skipped': len(bad), 'skipped_examples': bad[:3]}
        try:
          _write_json(state_path, state)
        except OSError as e:
          raise _write_error(out, state_path, e) from e
      shards.append({'file': name, 'count': state['count'], 'bytes': state['bytes'],
                     'sha256': state['sha256']})
      labels.extend(state['labels'])
      skipped += state['skipped']
      examples.extend(state['skipped_examples'][:3 - len(examples)])
      progress.add(len(positions), not kept,
                   f'{which} split {inp.split!r} shard {k + 1}/{num_shards} '
                   f'{"kept (checksum verified)" if kept else "written"}')
  if skipped:
    logging.warning('Skipped %d of %d files in %s that are not readable images '
                    '(truncated, corrupt or another format), e.g. %s.', skipped, n, inp.where,
                    examples)
  if not labels:
    raise errors.DataError(f'No readable image in {inp.where}: all {n} files failed to decode.')
  labels_name = f'{inp.split}.labels.npy'
  labels_path = os.path.join(out, labels_name)
  try:
    _write_file(labels_path, lambda f: np.save(f, np.asarray(labels, np.int32)))
  except OSError as e:
    raise _write_error(out, labels_path, e) from e
  return {'count': len(labels), 'skipped': skipped, 'source_split': inp.split,
          'class_names': inp.class_names, 'shards': shards,
          'labels': {'file': labels_name, 'bytes': os.path.getsize(labels_path),
                     'sha256': files.sha256_of(labels_path)}}


def _write_error(out: str, path: str, error) -> errors.DataError:
  done = len([n for n in os.listdir(os.path.join(out, STATE_DIR)) if n.endswith('.array_record.json')])
  full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
  return errors.DataError(
      f'Cannot write {path} ({error.strerror if isinstance(error, OSError) else error}). '
      f'{"Free space on that disk" if full else "Fix the directory"} (or raise the file-size '
      f'limit), then rerun the same command: the pack resumes and keeps its {done} '
      'finished shards (checked by their SHA-256).')


def run_pack(config, workdir: str) -> str:
  """Packs the train and eval splits of `config.data`'s source into `workdir`; returns it."""
  source = sources.from_config(config)
  spec = source.spec
  out = os.path.abspath(os.path.expanduser(workdir))
  if spec.kind == 'packed':
    raise errors.DataError(f'data.path={spec.path!r} is already packed: train and evaluate with '
                           f'--config.data.path={spec.path} (or pack its source instead).')
  if spec.kind == 'synthetic':
    raise errors.ConfigError('--mode=pack needs a source to read: set --config.data.path to an '
                             'ImageFolder directory or archive, or data.source=tfds.')
  if spec.pack_side <= 0:
    raise errors.ConfigError(f'data.pack_side={spec.pack_side} must be > 0 (default 256).')
  if spec.path and out.startswith(spec.path + os.sep):
    raise errors.DataError(f'--workdir={out} is inside data.path={spec.path!r}: pack into a '
                           'directory outside the source.')
  identity = _identity(spec)
  status = check_out(out, identity)
  if status == 'done':
    manifest = packed.read_manifest(out)
    for split in manifest['splits']:
      packed.check_files(out, split, manifest, checksums=True)
    logging.info('%s is already a complete pack of this source (every checksum verified): '
                 'nothing to do.', out)
    return out
  inputs = _inputs(source, spec.pack_side)
  state_dir = os.path.join(out, STATE_DIR)
  try:
    os.makedirs(state_dir, exist_ok=True)
    _write_json(os.path.join(state_dir, 'identity.json'), identity)
  except OSError as e:
    raise errors.DataError(f'Cannot write to --workdir={out} ({e.strerror}); choose a writable '
                           'directory.') from e
  if status == 'resume':
    logging.info('Resuming the stopped pack in %s: finished shards are verified and kept.', out)
  lists = {which: inp.digest() for which, inp in inputs.items()}
  lists_path = os.path.join(state_dir, 'lists.json')
  previous = _read_json(lists_path)
  if previous is not None and previous != lists:
    raise errors.DataError(f'The source {spec.path or spec.name} changed since the pack in {out} '
                           'was stopped (its file list differs): pack into a new or empty '
                           'directory.')
  _write_json(lists_path, lists)
  progress = _Progress(sum(len(inp) for inp in inputs.values()))
  splits = {}
  for which, inp in inputs.items():
    if inp.split in splits:  # Eval fell back to the train split itself.
      continue
    splits[inp.split] = _pack_split(out, which, inp, spec.num_workers, progress)
  manifest = {'format': packed.FORMAT, 'version': packed.FORMAT_VERSION, 'identity': identity,
              'source': {'kind': identity['kind'], 'path': spec.path, 'name': spec.name},
              'pack_side': spec.pack_side, 'quality': QUALITY,
              'count': sum(s['count'] for s in splits.values()),
              'class_names': inputs['train'].class_names, 'splits': splits}
  try:
    _write_json(os.path.join(out, packed.MANIFEST), manifest)
  except OSError as e:
    raise _write_error(out, os.path.join(out, packed.MANIFEST), e) from e
  shutil.rmtree(state_dir, ignore_errors=True)
  logging.info('Packed %s: %s into %s (%.1f MB); train with --config.data.path=%s.',
               spec.path or spec.name, ', '.join(f'{k} {v["count"]} images'
                                                 for k, v in splits.items()),
               out, sum(s['bytes'] for v in splits.values() for s in v['shards']) / 1e6, out)
  return out
