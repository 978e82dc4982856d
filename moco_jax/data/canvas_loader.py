"""The streaming loader with crops on the device: the host only decodes, into a padded canvas.

`data.stream_crops='device'` (the default). Every step, each JAX process reads
its 1/P slice of the global batch (the examples `train_indices(N, B, seed,
step)`, as `host_crops`) and decodes each image straight into its slot of the
step's batch buffer, uint8 [b, C, C, K] (C = `data.canvas_side`, K = `data.channels`), top-left,
the rest zero, with its true (height, width) beside it. Both
RandomResizedCrop boxes are drawn, cut and resized in the jitted step
(`augment.two_views_from_canvas`), from keys folded from the global example
id as on the in-memory path: 1 or 8 devices, and a resumed run, see the same
views. The host's two antialiased resizes per image, which cost more than the
decode (docs/benchmarks.md), move to the accelerator.

An image that fits the canvas is decoded at full size: no draft, so nothing
differs from the original. A larger one is reduced on the host first, once: a
JPEG at the DCT scale (1/2, 1/4, 1/8) that makes it fit, anything still too
large by an antialiased resize; its boxes are then drawn on the reduced
image, and the batch's 'reduced' count lets the caller say so once.
The default C = 512 holds ImageNet's usual photos (at most 500 px a side)
whole, and up to 4096 px after one draft reduction.

Images with other channel counts, and .npy arrays, are read with their own
channels (`moco_jax.data.channels`) into the same canvases.

Host memory: (threads + prefetch) batches of b x C x C x K bytes per worker
process (`host_crops.read_batches`), as bounded as the host-crop loader's.
Unreadable files are replaced as in `host_crops` (same substitutes, counted).
No JAX here: grain's worker processes import this module.
"""

from typing import Iterator, Optional

import numpy as np
from PIL import Image

from moco_jax.data import batching
from moco_jax.data import channels as channels_lib
from moco_jax.data import decode
from moco_jax.data import decoders
from moco_jax.data import host_crops
from moco_jax.data.dataset import StreamSource

# Pillow's JPEG draft scales: an image larger than the canvas is decoded at
# the first that makes it fit.
_DRAFT_SCALES = (2, 4, 8)


def fit_scale(width: int, height: int, side: int) -> int:
  """The DCT scale (1, 2, 4, 8) at which a width x height JPEG fits a side x side canvas (8 at most)."""
  if width <= side and height <= side:
    return 1
  for scale in _DRAFT_SCALES:
    if -(-width // scale) <= side and -(-height // scale) <= side:
      return scale
  return _DRAFT_SCALES[-1]


def decode_into(encoded, canvas: np.ndarray, decoder: str = 'pillow') -> Optional[tuple]:
  """Decodes one image into `canvas` (uint8 [C, C, 3]): (height, width, reduced), or None.

  The image lands in the top-left corner and the rest of the canvas is set to
  0. `reduced` says the image was larger than the canvas and was reduced (a
  JPEG draft at `fit_scale`, then, if still too large, an antialiased
  bilinear resize to fit). None for an unreadable file.
  """
  side = canvas.shape[0]

  def reduce_to(width, height):
    scale = fit_scale(width, height, side)
    # Pillow's draft picks the largest power of two <= size // target: with
    # target = size // scale that is `scale` itself (decoders.draft_scale).
    return None if scale == 1 else (max(1, width // scale), max(1, height // scale))

  try:
    array, (width, height) = decoders.load_rgb_array(encoded, reduce_to, decoder)
    reduced = array.shape[:2] != (height, width)
    h, w = array.shape[:2]
    if h > side or w > side:
      fit = side / max(h, w)
      h, w = max(1, min(side, round(h * fit))), max(1, min(side, round(w * fit)))
      array = np.asarray(Image.fromarray(array).resize((w, h), Image.BILINEAR))
      reduced = True
  except decode.DECODE_ERRORS:
    return None
  return _place(array, canvas, reduced)


def decode_channels_into(encoded, name: str, canvas: np.ndarray) -> Optional[tuple]:
  """`decode_into` for a file read with its own channels (`channels.keeps_channels`: any file
  when data.channels != 3, a .npy always): canvas uint8 [S, S, C].

  Values become uint8 by `channels.to_uint8`'s rules, as on the in-memory path;
  an image larger than the canvas is reduced to fit by each channel's
  antialiased bilinear resize. None for an unreadable file; `channels.ChannelError`
  for a file with another channel count than the canvas (a mixed folder).
  """
  array = channels_lib.read_uint8(encoded, name, canvas.shape[-1])
  if array is None:
    return None
  side, (h, w) = canvas.shape[0], array.shape[:2]
  reduced = h > side or w > side
  if reduced:
    fit = side / max(h, w)
    h, w = max(1, min(side, round(h * fit))), max(1, min(side, round(w * fit)))
    array = channels_lib.resize_channels(array, (w, h))
  return _place(array, canvas, reduced)


def _place(array: np.ndarray, canvas: np.ndarray, reduced: bool) -> tuple:
  """Writes `array` into the top-left of `canvas`, zero elsewhere: (height, width, reduced)."""
  h, w = array.shape[:2]
  canvas[:h, :w] = array
  canvas[h:] = 0
  canvas[:h, w:] = 0
  return h, w, reduced


class LoadCanvasBatch:
  """Step -> this process's slice of that step's global batch, decoded into canvases.

  Position j of this process's slice is position process_index * local + j
  of the global batch: example `train_indices(N, B, seed, step)[position]`,
  as `host_crops.LoadExample`. Picklable (grain sends it to worker processes).
  """

  def __init__(self, source: StreamSource, *, global_batch: int, seed: int, process_index: int,
               process_count: int, canvas_side: int, decoder: str = 'pillow', channels: int = 3):
    self.source = source
    self.channels = channels
    self.has_arrays = getattr(source, 'has_arrays', False)  # A list with .npy files in it.
    self.num = len(source)
    self.global_batch, self.seed = global_batch, seed
    self.local = global_batch // process_count
    self.offset = process_index * self.local
    self.side = canvas_side
    self.decoder = decoder
    # data.max_image_pixels, carried to grain's worker processes (which start with Pillow's own).
    self.max_pixels = decode.max_image_pixels()

  def __call__(self, step: int) -> dict:
    decode.set_max_image_pixels(self.max_pixels)
    step = int(step)
    indices = batching.train_indices(self.num, self.global_batch, self.seed, step)
    mine = indices[self.offset:self.offset + self.local]
    # A plain array, copied once into shared memory by grain in a worker process.
    # (Decoding straight into a grain SharedMemoryArray saves that copy but leaks
    # the segments of batches still in a worker's read buffer when the loader closes.)
    batch = {'image': np.empty((self.local, self.side, self.side, self.channels), np.uint8),
             'size': np.empty((self.local, 2), np.int32),
             'label': np.empty((self.local,), np.int32),
             'index': np.empty((self.local,), np.int64),
             'skipped': np.zeros((self.local,), np.int32),
             'reduced': np.zeros((self.local,), np.int32)}
    for j, index in enumerate(mine):
      self._load(int(index), j, batch)
    return batch

  def _load(self, index: int, j: int, batch: dict):
    canvas = batch['image'][j]

    def decode_fn(encoded, candidate):
      if self.channels != 3 or self.has_arrays:  # Only then can a file keep its channels.
        name = self.source.name(candidate)
        if channels_lib.keeps_channels(name, self.channels):
          return decode_channels_into(encoded, name, canvas)
      return decode_into(encoded, canvas, self.decoder)

    candidate, attempt, (h, w, reduced) = host_crops.read_substituted(
        self.source, self.seed, index, decode_fn)
    batch['size'][j] = (h, w)
    batch['label'][j] = self.source.label(candidate)
    batch['index'][j] = candidate
    batch['skipped'][j] = attempt
    batch['reduced'][j] = int(reduced)


def train_batches(source: StreamSource, *, global_batch: int, seed: int, canvas_side: int,
                  start_step: int = 0, end_step: Optional[int] = None, process_index: int = 0,
                  process_count: int = 1, num_threads: int = 4, num_processes: int = 0,
                  prefetch: int = 2, decoder: str = 'pillow', channels: int = 3) -> Iterator[dict]:
  """Yields this process's slice of every global batch from `start_step` on, as canvases.

  Batches are {'image': uint8 [b, C, C, K], 'size': int32 [b, 2] (true height,
  width), 'label': int32 [b], 'index': int64 [b] (dataset index read),
  'skipped': int32 [b] (unreadable files replaced), 'reduced': int32 [b]
  (images larger than the canvas, reduced on the host)}, b = global_batch /
  process_count, C = canvas_side, K = `channels` (data.channels). Step s holds `train_indices(N, global_batch,
  seed, s)`, so a run resumed at `start_step` continues the same sequence.
  Threads, worker processes and prefetch as `host_crops.train_batches`.
  """
  import grain  # pylint: disable=g-import-not-at-top
  num = len(source)
  if num // global_batch == 0:
    raise ValueError(f'batch_size={global_batch} is larger than the dataset ({num} examples).')
  batching.local_batch(global_batch, process_count)
  end_step = end_step if end_step is not None else 2**40
  load = LoadCanvasBatch(source, global_batch=global_batch, seed=seed,
                         process_index=process_index, process_count=process_count,
                         canvas_side=canvas_side, decoder=decoder, channels=channels)
  ds = grain.MapDataset.range(start_step, end_step).map(load)
  return host_crops.read_batches(ds, num_threads, num_processes, prefetch)


def batch_bytes(local_batch: int, canvas_side: int, channels: int = 3) -> int:
  """Bytes of one batch of canvases (what each batch in flight holds)."""
  return local_batch * canvas_side * canvas_side * channels
