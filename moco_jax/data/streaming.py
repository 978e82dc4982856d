"""Streaming input: which splits are too large to decode into host memory, and why.

Small splits keep the decoded in-memory path (`load_split`, optionally
`data.on_device`): one decode per image per run, then only gathers. A split
whose decoded size (N x S x S x 3 bytes) exceeds `data.max_in_memory_gb`
(default: 25% of the host's RAM) is streamed instead (`plan_split` decides,
and says why in the log). This module only plans; training reads a streamed
split through `moco_jax.data.host_crops`, evaluation through
`moco_jax.data.eval_reader`:

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

Each source offers its decoded split and its random-access reader
(`dataset.StreamSource`): ImageFolder directories (`folder.load_folder`,
`folder_reader.FolderSource`: the file list indexed once, cached as .npy and
read back with mmap so worker processes share it), prepared tfds datasets
(`tfds_source.load_tfds`, `tfds_source.TfdsSource` via `tfds.data_source`:
array_record files allow random access) and synthetic data
(`sources.load_synthetic`, `sources.SyntheticSource`). Tar archives are
sequential, so a split too large for memory must be unpacked into a
directory (the error says so).

This module imports neither JAX nor TensorFlow (tfds only for tfds sources),
so grain worker processes start quickly.
"""

import dataclasses
import hashlib
import os
from typing import Optional

from absl import logging
import numpy as np

from moco_jax.core import errors
from moco_jax.data import cache
from moco_jax.data import dataset
from moco_jax.data import folder
from moco_jax.data import folder_reader
from moco_jax.data import sources
from moco_jax.data import tfds_source
from moco_jax.data.dataset import StreamSource  # pylint: disable=unused-import (re-exported)
from moco_jax.data.folder_reader import FolderSource  # pylint: disable=unused-import
from moco_jax.data.tfds_source import TfdsSource  # pylint: disable=unused-import

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
  """Decides between the in-memory and the streaming path for the train split, and logs why."""
  return plan_split(data_config, 'train')


def plan_split(data_config, split: str = 'train', log: bool = True,
               evaluation: bool = False) -> Plan:
  """Decides between the in-memory and the streaming path for `split` ('train' or 'eval').

  The decoded size is N x S x S x 3 bytes (S = `image_side`, what the
  in-memory path would hold). Synthetic data always stays in memory. Archives
  cannot be streamed: for an evaluation (`evaluation`) they are decoded into
  memory without counting their images first (a pass over the archive, ~10 s
  for Imagenette, that training pays once and caches).
  """
  source = sources.resolve_source(data_config)
  if source == 'synthetic':
    return Plan(False, 'synthetic data is generated in memory')
  if evaluation and source == 'folder' and _is_archive(data_config.path):
    return Plan(False, 'archives are decoded into memory')
  side = dataset.image_side(data_config)
  budget, budget_text = memory_budget_bytes(data_config)
  if source == 'folder' and _is_archive(data_config.path):
    return _plan_archive(data_config, side, budget, budget_text, split)
  if source == 'tfds':  # Only open the data source (array_record files) to stream.
    builder, name = tfds_source.builder_and_split(data_config, split)
    splits = builder.info.splits
    count = splits[name].num_examples if name in splits.keys() else 0
    where = f'tfds {data_config.name}:{name}'
    stream_source = None
    if not count:  # A mocked builder (tfds.testing.mock_data) lists no splits.
      stream_source = open_source(data_config, split)
      count = len(stream_source)
  else:
    stream_source = open_source(data_config, split)
    count, where = len(stream_source), stream_source.where
  size = count * side * side * 3
  what = (f'the {split} split ({count:,} images of {where}) decodes to {size / 2**30:.2f} GiB '
          f'at {side} px')
  if size > budget:
    plan = Plan(True, f'{what} > {budget / 2**30:.2f} GiB = {budget_text}: streaming it',
                stream_source or open_source(data_config, split))
  else:
    plan = Plan(False, f'{what} <= {budget / 2**30:.2f} GiB = {budget_text}: decoding it into '
                'memory once')
  if log:
    logging.info('Input: %s.', plan.reason)
  return plan


def _is_archive(path: str) -> bool:
  path = os.path.abspath(os.path.expanduser(path))
  return os.path.isfile(path) and path.lower().endswith(folder.ARCHIVE_SUFFIXES)


def _plan_archive(data_config, side: int, budget: int, budget_text: str,
                  split: str = 'train') -> Plan:
  """Archives stay on the in-memory path; one too large for memory is refused, clearly.

  The number of train images is counted by one listing pass over the archive
  (headers only; a compressed archive still has to be decompressed once) and
  cached by the archive's (path, mtime, size), so it is paid once.
  """
  count = _archive_train_count(data_config)
  size = count * side * side * 3
  if split != 'train':  # Eval splits of archives are small (Imagenette, CIFAR): never streamed.
    return Plan(False, f'data.path={data_config.path!r} is an archive: its {split} split is '
                'decoded into memory')
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
         'version': folder_reader.INDEX_VERSION}
  path = cache.cache_path(data_config, key, 'archive-count') + '.json'
  cached = cache.read_json(path)
  if cached is not None and isinstance(cached.get('count'), int):
    return cached['count']
  tree = folder.Tree(data_config.path)
  train_dir = data_config.train_split
  count = sum(len(v) for v in tree.classes(train_dir).values()) if train_dir in tree.splits() else 0
  cache.write_json(path, {'count': count})
  return count


# --------------------------------------------------------------------------
# The sources' random-access readers (each source module offers its own).


def file_list_fingerprint(source: StreamSource) -> dict:
  """{count, sha256, where} of a source's file list and labels: a streamed resume compares it.

  A folder hashes its indexed names and labels (cheap next to listing them);
  a tfds split, its name and size (its files are immutable once prepared).
  """
  digest = hashlib.sha256()
  if isinstance(source, FolderSource):
    source._open()  # pylint: disable=protected-access
    digest.update(np.ascontiguousarray(source._names).tobytes())  # pylint: disable=protected-access
    digest.update(np.ascontiguousarray(source._labels).tobytes())  # pylint: disable=protected-access
  digest.update(str(len(source)).encode())
  return {'count': len(source), 'sha256': digest.hexdigest(), 'where': source.where}


def open_source(data_config, split: str = 'train') -> StreamSource:
  """`split` ('train' or 'eval') of `data_config` as a StreamSource (folder directory or tfds)."""
  source = sources.resolve_source(data_config)
  if source == 'folder':
    if _is_archive(data_config.path):
      raise errors.DataError(f'data.path={data_config.path!r} is an archive: archives cannot be '
                       'streamed; unpack it into a directory and point data.path at it.')
    return folder_reader.open_folder_source(data_config, split)
  if source == 'tfds':
    return tfds_source.open_tfds_source(data_config, split)
  return sources.SyntheticSource(data_config, split)


