"""Streaming input: which splits are too large to decode into host memory, and why.

Small splits keep the decoded in-memory path (`Source.load`, optionally
`data.on_device`): one decode per image per run, then only gathers. A split
whose decoded size (N x S x S x 3 bytes) exceeds `data.max_in_memory_gb`
(default: 25% of the host's RAM) is streamed instead (`plan` decides, and
says why in the log). This module only plans; training reads a streamed
split through `moco_jax.data.host_crops`, evaluation through
`moco_jax.data.eval_reader`:

  * Every step, each JAX process reads and decodes only its own 1/P slice of
    the global batch: the examples of step s are `train_indices(N, B, seed, s)`
    (the in-memory path's order), sliced by process.
  * The host decodes each image once per step into a padded canvas and the
    step cuts MoCo's two RandomResizedCrop views (`moco_jax.data.canvas_loader`,
    data.stream_crops='device'); or the host cuts them from the whole original
    image (`moco_jax.data.host_crops`, 'host'); colour ops stay on the accelerator.
  * The loader is grain: a `MapDataset` over this process's flat example
    positions, mapped by `LoadExample`, batched, read with threads
    (`ReadOptions`) and optionally worker processes (`mp_prefetch`). Because
    the order is a pure function of (seed, step), resuming at step s is
    slicing the dataset at s: no iterator state needs checkpointing.
  * An unreadable file is replaced by another example chosen
    deterministically from (seed, index, attempt), counted in the batch's
    'skipped' field and reported by the caller; it never stops the run.

Each `dataset.Source` offers its decoded split (`load`) and its
random-access reader (`open`, a `dataset.StreamSource`): ImageFolder
directories (the file list indexed once, cached as .npy and read back with
mmap so worker processes share it), prepared tfds datasets (`tfds.data_source`:
array_record files allow random access). Tar archives are sequential, so a
split too large for memory must be unpacked into a directory (the error says
so); synthetic data is generated in memory. `open_split` is the one place that
plans and then opens a split: every caller gets the form the plan chose.

This module imports neither JAX nor TensorFlow (tfds only for tfds sources),
so grain worker processes start quickly.
"""

import dataclasses
from typing import Optional, Union

from absl import logging

from moco_jax.core import errors
from moco_jax.data.dataset import ImageDataset, Source, StreamSource


@dataclasses.dataclass
class Plan:
  """How a split is read: streamed (with its reader) or decoded into memory, and why."""
  stream: bool
  reason: str
  reader: Optional[StreamSource] = None


@dataclasses.dataclass
class Split:
  """A split opened as its plan says: `data` is an ImageDataset (in memory) or a StreamSource."""
  data: Union[ImageDataset, StreamSource]
  plan: Plan

  @property
  def stream(self) -> bool:
    return self.plan.stream


def plan(source: Source, split: str = 'train', log: bool = True,
         evaluation: bool = False) -> Plan:
  """Decides between the in-memory and the streaming path for `split` ('train' or 'eval').

  The decoded size is N x S x S x 3 bytes (S = `spec.side`, what the
  in-memory path would hold). Synthetic data always stays in memory. Archives
  cannot be streamed: for an evaluation (`evaluation`) they are decoded into
  memory without counting their images first (a pass over the archive, ~10 s
  for Imagenette, that training pays once and caches); a train split too large
  for memory is refused, clearly.
  """
  spec = source.spec
  if spec.kind == 'synthetic':
    return Plan(False, 'synthetic data is generated in memory')
  if not source.streamable and (evaluation or split != 'train'):
    return Plan(False, f'data.path={spec.path!r} is an archive: its {split} split is decoded '
                'into memory')
  budget, budget_text = spec.memory_budget, spec.memory_budget_text
  count = source.count(split)  # tfds: from its metadata; a folder: its cached file index.
  size = count * spec.side * spec.side * spec.channels
  what = (f'the {split} split ({count:,} images of {source.describe()}) decodes to {size / 2**30:.2f} GiB '
          f'at {spec.side} px')
  if size > budget and not source.streamable:
    raise errors.DataError(
        f'{what}, more than {budget / 2**30:.2f} GiB = {budget_text}. Tar archives are read '
        'sequentially and cannot be streamed: large sets must be directories. Unpack it '
        f'(mkdir DIR && tar xf {spec.path} -C DIR) and set --config.data.path=DIR, '
        'or raise --config.data.max_in_memory_gb if this host has the memory.')
  if size > budget:
    reader = source.open(split)
    if (not evaluation and spec.stream_crops == 'host'
        and (spec.channels != 3 or getattr(reader, 'has_arrays', False))):
      # The host-crop loader cuts RGB Pillow images; the canvas loader reads any channels.
      raise errors.DataError(
          f'{what}, more than {budget_text}, and data.stream_crops=\'host\' cuts 3-channel '
          f'images only (data.channels={spec.channels}' +
          (', .npy arrays' if spec.channels == 3 else '') + '): set '
          '--config.data.stream_crops=device (the default), or raise '
          '--config.data.max_in_memory_gb so the split is decoded into memory once.')
    result = Plan(True, f'{what} > {budget / 2**30:.2f} GiB = {budget_text}: streaming it',
                  reader)
  else:
    result = Plan(False, f'{what} <= {budget / 2**30:.2f} GiB = {budget_text}: decoding it into '
                  'memory once')
  if log:
    logging.info('Input: %s.', result.reason)
  return result


def open_split(source: Source, split: str = 'train', *, evaluation: bool = False,
               log: bool = True) -> Split:
  """`split` of `source` in the form its plan chose: the reader, or the decoded split."""
  chosen = plan(source, split, log=log, evaluation=evaluation)
  return Split(chosen.reader if chosen.stream else source.load(split), chosen)
