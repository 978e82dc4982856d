"""The streaming loader that crops on the host (data.stream_crops='host'), with grain.

The default streamed path decodes only, into padded canvases, and crops in
the step (`moco_jax.data.canvas_loader`); this one is kept for comparison
(benchmarks/bench_stream.py row a) and for the paper's linear protocol.

Every step, each JAX process reads and decodes only its own 1/P slice of the
global batch: the examples of step s are `train_indices(N, B, seed, s)` (the
in-memory path's order), sliced by process. Each image is decoded once, at
reduced size where the crops allow it (Pillow's JPEG `draft`), and MoCo's two
RandomResizedCrop views are cut from the WHOLE original image, each resized to
`image_size`: the batch is uint8 [b, 2, image_size, image_size, 3]. The boxes
are sampled exactly as torchvision samples them (`crop_box`, a NumPy twin of
`image_ops.crop_box_from_uniforms`: worker processes import no JAX) from
uniforms that are a pure function of (seed, step, position in the global
batch). Colour jitter, grayscale, blur, flip and normalisation stay on the
accelerator (`augment.two_views_from_crops`). An unreadable file is replaced
by another example chosen deterministically and counted; it never stops a run.
Which splits stream, and when: `moco_jax.data.streaming`.
"""

import math
import mmap
import os
import signal
from typing import Callable, Iterator, Optional

from absl import flags
from absl import logging
import numpy as np
from PIL import Image

from moco_jax.augmentation import crop_fallback
from moco_jax.core import errors
from moco_jax.data import batching
from moco_jax.data import decode
from moco_jax.data import decoders
from moco_jax.data.dataset import StreamSource
from moco_jax.data.spec import DataSpec


# Uniforms one RandomResizedCrop consumes (as image_ops.CROP_UNIFORMS): 10 area
# draws, 10 log-ratio draws, top, left.
CROP_TRIES = 10
CROP_UNIFORMS = 2 * CROP_TRIES + 2
# How many substitutes are tried for an unreadable example before giving up.
MAX_SUBSTITUTES = 16
# A JPEG is decoded at reduced DCT scale only while both crop boxes keep at
# least this many times the output side: the final antialiased resize then
# still filters >= 2 source pixels per output pixel; at 1x the DC-only 1/8
# decode aliases (docs/benchmarks.md, "Numbers behind design choices").
_DRAFT_MARGIN = 2
_DECODE_ERRORS = decode.DECODE_ERRORS


# --------------------------------------------------------------------------
# Crops on the host.


def crop_uniforms(seed: int, step: int, position: int) -> np.ndarray:
  """float32 [2, CROP_UNIFORMS]: both views' crop randomness at (seed, step, global position)."""
  rng = np.random.default_rng([seed, step, position, 0x63726F70])  # 'crop'
  return rng.random((2, CROP_UNIFORMS), dtype=np.float32)


def linear_uniforms(seed: int, epoch: int, index: int) -> np.ndarray:
  """float32 [1, CROP_UNIFORMS]: the paper linear protocol's crop of example `index` in `epoch`."""
  rng = np.random.default_rng([seed, epoch, index, 0x6C696E])  # 'lin'
  return rng.random((1, CROP_UNIFORMS), dtype=np.float32)


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
  return np.array(crop_fallback.fallback_box(height, width, ratio), np.int64)


def two_crops(encoded, u: np.ndarray, size: int, scale, ratio,
              decoder: str = 'pillow') -> Optional[np.ndarray]:
  """Decodes one image and cuts a RandomResizedCrop per row of `u`: uint8 [V, size, size, 3].

  (V = 2 for MoCo's two views; the paper's linear protocol cuts 1.)

  The boxes are sampled over the whole original image. A JPEG is decoded at
  the smallest DCT scale (1, 1/2, 1/4, 1/8) that still leaves both boxes at
  least 2 x `size` px on their shorter side (`draft`), so a crop is never
  upsampled from a reduced decode and is still resized with antialiasing.
  Each box is then resized (bilinear, antialiased, as torchvision's PIL
  path) straight from the decoded image.
  Returns None for an unreadable image.

  Args:
    encoded: the file's bytes, or a decoded uint8 array [H, W, C] (mocked tfds).
    u: float32 [V, CROP_UNIFORMS] (`crop_uniforms`: V = 2).
    size: output side (data.image_size).
    scale, ratio: RandomResizedCrop's ranges (aug.crop_scale, aug.crop_ratio).
    decoder: 'pillow' or 'simplejpeg' (data.decoder; `decoders`).
  """
  boxes = []

  def reduce_to(width, height):
    """Boxes over the whole original image; a JPEG decode reduced while both keep 2 x size."""
    boxes.extend(crop_box(u[v], height, width, scale, ratio) for v in range(len(u)))
    shortest = min(min(int(b[2]), int(b[3])) for b in boxes)
    keep = _DRAFT_MARGIN * size  # Shorter box side kept after a reduced decode.
    if shortest < 2 * keep:
      return None
    return max(1, width * keep // shortest), max(1, height * keep // shortest)

  try:
    # The in-memory path's decoder (16-bit, float, CMYK, palette... the same 8-bit RGB).
    image, (width, height) = decoders.load_rgb(encoded, reduce_to, decoder)
    if not boxes:  # Not a JPEG: reduce_to was not asked.
      boxes = [crop_box(u[v], height, width, scale, ratio) for v in range(len(u))]
    with image:
      sx, sy = image.width / width, image.height / height
      out = np.empty((len(u), size, size, 3), np.uint8)
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
  Picklable (grain sends it to worker processes). `uniforms`, when given, is a
  picklable `uniforms(seed, epoch, index)` -> float32 [V, CROP_UNIFORMS] used
  instead of `crop_uniforms` (the linear protocol: V = 1, keyed by dataset index).
  """

  def __init__(self, source: StreamSource, *, global_batch: int, seed: int, process_index: int,
               process_count: int, image_size: int, crop_scale, crop_ratio, uniforms=None,
               decoder: str = 'pillow'):
    self.source = source
    self.num = len(source)
    self.global_batch, self.seed = global_batch, seed
    self.local = global_batch // process_count
    self.offset = process_index * self.local
    self.image_size = image_size
    self.scale, self.ratio = tuple(crop_scale), tuple(crop_ratio)
    self.uniforms = uniforms
    self.decoder = decoder
    # data.max_image_pixels, carried to grain's worker processes (which start with Pillow's own).
    self.max_pixels = decode.max_image_pixels()

  def __call__(self, i: int) -> dict:
    decode.set_max_image_pixels(self.max_pixels)
    step, j = divmod(int(i), self.local)
    position = self.offset + j
    index = int(batching.train_indices(self.num, self.global_batch, self.seed, step)[position])
    if self.uniforms is None:
      u = crop_uniforms(self.seed, step, position)
    else:
      u = self.uniforms(self.seed, step // (self.num // self.global_batch), index)
    candidate, attempt, crops = read_substituted(
        self.source, self.seed, index,
        lambda encoded, candidate: two_crops(encoded, u, self.image_size, self.scale,
                                             self.ratio, self.decoder))
    return {'image': crops, 'label': np.int32(self.source.label(candidate)),
            'index': np.int64(candidate), 'skipped': np.int32(attempt)}


def read_substituted(source: StreamSource, seed: int, index: int, decode_fn: Callable):
  """(example read, attempt, decode_fn's result) for example `index`, unreadable files replaced.

  `decode_fn(encoded, candidate)` (the bytes and the index they were read from;
  a source's `name` can cost a read, so it is asked only when needed) returns
  None for an unreadable file; then up to
  MAX_SUBSTITUTES others are tried (`substitute_index`: the same ones on every
  process, in every loader), the replacement is logged with the reason
  (`decode.unreadable_reason`), and DataError ends a run of unreadable ones.
  """
  num, candidate, first = len(source), index, b''
  for attempt in range(MAX_SUBSTITUTES + 1):
    if attempt:
      candidate = substitute_index(num, seed, index, attempt)
    try:
      encoded = source.read(candidate)
    except OSError:
      encoded = b''
    if not attempt:
      first = encoded
    result = decode_fn(encoded, candidate)
    if result is not None:
      if attempt:
        logging.warning('Unreadable image %s (%s): read %s instead.', source.name(index),
                        decode.unreadable_reason(first), source.name(candidate))
      return candidate, attempt, result
  raise errors.DataError(f'{MAX_SUBSTITUTES + 1} examples in a row failed to decode in '
                         f'{source.where} (first: {source.name(index)}): is it an image '
                         'folder?')


def train_batches(source: StreamSource, *, global_batch: int, seed: int, image_size: int,
                  crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), start_step: int = 0,
                  end_step: Optional[int] = None, process_index: int = 0,
                  process_count: int = 1, num_threads: int = 4,
                  num_processes: int = 0, prefetch: int = 2, uniforms=None,
                  decoder: str = 'pillow') -> Iterator[dict]:
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
    uniforms: `LoadExample`'s (None: MoCo's two views).
    decoder: 'pillow' or 'simplejpeg' (data.decoder).
  """
  import grain  # pylint: disable=g-import-not-at-top
  num = len(source)
  if num // global_batch == 0:
    raise ValueError(f'batch_size={global_batch} is larger than the dataset ({num} examples).')
  local = batching.local_batch(global_batch, process_count)
  end_step = end_step if end_step is not None else 2**40
  load = LoadExample(source, global_batch=global_batch, seed=seed, process_index=process_index,
                     process_count=process_count, image_size=image_size, crop_scale=crop_scale,
                     crop_ratio=crop_ratio, uniforms=uniforms, decoder=decoder)
  ds = grain.MapDataset.range(start_step * local, end_step * local).map(load)
  ds = ds.batch(local, drop_remainder=True)
  return read_batches(ds, num_threads, num_processes, prefetch)


def read_batches(ds, num_threads: int, num_processes: int, prefetch: int) -> Iterator[dict]:
  """A grain MapDataset of whole batches, read by threads and optionally worker processes."""
  import grain  # pylint: disable=g-import-not-at-top
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
    return _UnlinkedBatches(iter(it))
  return iter(it)


class _UnlinkedBatches:
  """Grain's worker batches, each shared-memory segment unlinked as it arrives.

  Grain hands worker batches over in POSIX shared memory and unlinks a segment
  when its array is deleted, on a background thread; at exit the last batches'
  deletions had not run, and Python's resource_tracker reported "N leaked
  shared_memory objects" after every streamed run. Unlinking removes only the
  name: the mapping stays valid until the array is freed, so nothing is copied.
  """

  def __init__(self, batches):
    self._batches = batches

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self._batches)
    for array in batch.values():
      if isinstance(getattr(array, 'base', None), mmap.mmap) and hasattr(array, 'unlink_on_del'):
        array.shm.unlink()
        array._unlink_on_del = False  # pylint: disable=protected-access
    return batch

  def close(self):
    self._batches.close()


def _ignore_ctrl_c(worker_index: int, worker_count: int):
  """In each grain worker: a terminal's Ctrl-C reaches the whole process group, but
  stopping is the train loop's job (`moco_jax.run.stopping`: finish the step, save, exit 130),
  so workers must not die of it with a KeyboardInterrupt traceback."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def loader_workers(spec: DataSpec, decode_only: bool = False) -> tuple[int, int]:
  """(worker processes, threads per process) of a streaming loader.

  data.stream_processes worker processes, each reading with one thread, or
  with 0 data.num_workers threads in this process (Pillow and simplejpeg
  release the GIL while decoding and resizing, the Python around it does not).
  -1 (auto) picks by the loader's work: the host-crop loader (decode + two
  resizes) gets one process per core but one, for the train loop; the canvas
  loader (`decode_only`: crops on the device) gets that many threads in this
  process instead, because a worker process hands each canvas batch over
  through shared memory, and that copy costs more than decoding a 256 px JPEG
  (docs/benchmarks.md, issue 29).
  """
  cores = usable_cores()
  processes = spec.stream_processes
  if processes < 0:
    auto = max(1, cores - 1)
    return (0, auto) if decode_only else (auto, 1)
  if processes > cores:
    # More decoding processes than cores only add switching and memory (32 on 2
    # cores: a first step of 137 s instead of ~16 s).
    logging.warning('config.data.stream_processes=%d is more than the %d cores this process may '
                    'use: using %d loader processes.', processes, cores, cores)
    processes = cores
  threads = 1 if processes > 0 else max(1, spec.num_workers)
  return processes, threads


def usable_cores() -> int:
  """Cores this process may run on (its CPU affinity: taskset, cgroups' cpusets), at least 1."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except (AttributeError, OSError):  # Not Linux.
    return max(1, os.cpu_count() or 1)
