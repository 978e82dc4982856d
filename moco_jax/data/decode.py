"""Decoding image files to fixed-size uint8 RGB arrays, in a thread pool.

Pillow does the work: JPEGs much larger than the target are decoded at a
reduced DCT scale (`draft`), every mode is converted to RGB, and files that are
not readable images come back as None so that callers can skip and count them.
"""

import concurrent.futures
import io
import re
import threading
import warnings
from typing import Callable, Iterable, Optional

from absl import logging
import numpy as np
from PIL import Image

from moco_jax.core import errors

# Errors Pillow raises for truncated, corrupt or non-image files.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


# Pillow refuses images over 2 x Image.MAX_IMAGE_PIXELS (its decompression-bomb guard) and
# warns over 1 x: `set_max_image_pixels` (config.data.max_image_pixels) moves the refusal, and
# the warning is dropped (the refusal is reported per split, with the field that raises it).
DEFAULT_MAX_IMAGE_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
warnings.filterwarnings('ignore', category=Image.DecompressionBombWarning)
_why = threading.local()  # Why the last decode_image of this thread returned None.
_TOO_LARGE: dict = {}  # name -> 'W x H = N pixels', filled by decode_stream, read by keep_decoded.


def set_max_image_pixels(limit: int) -> None:
  """Images with more pixels than `limit` are refused as too large; -1: no limit."""
  Image.MAX_IMAGE_PIXELS = None if limit == -1 else limit / 2


def configure(config) -> None:
  """Applies `config.data.max_image_pixels` to Pillow (once per process, before any decode)."""
  set_max_image_pixels(config.data.get('max_image_pixels', DEFAULT_MAX_IMAGE_PIXELS))


def max_image_pixels() -> int:
  return -1 if Image.MAX_IMAGE_PIXELS is None else int(2 * Image.MAX_IMAGE_PIXELS)


def unreadable_reason(encoded) -> str:
  """Why `encoded` did not decode, in words, for the streaming loaders' warning.

  An image over the pixel limit is no corrupt file: it is named as too large,
  with the limit and the field that raises it; anything else is unreadable.
  """
  try:
    with Image.open(io.BytesIO(bytes(encoded))):
      pass
  except Image.DecompressionBombError as e:
    found = re.search(r'\((\d+) pixels\)', str(e))
    return (f'{found.group(1) if found else "more"} pixels, over the decoder\'s limit of '
            f'{max_image_pixels()}: raise --config.data.max_image_pixels (-1: no limit) if it '
            'is a real image')
  except Exception:  # pylint: disable=broad-except
    pass
  return 'not a readable image file'


_SIXTEEN_BIT = ('I;16', 'I;16L', 'I;16B', 'I;16N')


def to_8bit(image: Image.Image) -> Image.Image:
  """A 16-bit, 32-bit integer or float single-channel image scaled to 8-bit 'L'.

  Pillow's own convert('RGB') clips these at 255: a full-range 16-bit PNG comes
  out white and a [0, 1] float TIFF black. Here 16-bit images are divided by
  257 (65535 -> 255); 'I' (32-bit) and 'F' images are read by their range:
  floats within [0, 1] are x255, values within [0, 255] are kept, within
  [0, 65535] divided by 257, anything else min-max scaled. NaN becomes 0.
  Other modes are returned unchanged.
  """
  if image.mode not in _SIXTEEN_BIT + ('I', 'F'):
    return image
  return Image.fromarray(scale_to_uint8(np.asarray(image), image.mode in _SIXTEEN_BIT,
                                        image.mode == 'F'), 'L')


def scale_to_uint8(array, sixteen_bit: bool, floating: bool) -> np.ndarray:
  """uint8 of 16-bit, float or wide-range values: the one scaling law of every decoder.

  16-bit / 257; floats in [0, 1] x 255; values already in [0, 255] kept; [0, 65535] / 257;
  anything else stretched from its own min-max. Non-finite values count as 0.
  """
  values = np.asarray(array, np.float64)
  values = np.where(np.isfinite(values), values, 0.0)
  low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
  if sixteen_bit:
    scaled = values / 257.0
  elif floating and low >= 0 and high <= 1:
    scaled = values * 255.0
  elif low >= 0 and high <= 255:
    scaled = values
  elif low >= 0 and high <= 65535:
    scaled = values / 257.0
  else:
    scaled = (values - low) * (255.0 / max(high - low, 1e-12))
  return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def load_rgb(encoded, reduce_to: Optional[Callable] = None):
  """The one decoder of both input paths: (8-bit RGB Pillow image, original (width, height)).

  In-memory (`decode_image`) and streamed (`host_crops.two_crops`) examples
  both come through here, so an odd file (16-bit or float, CMYK, grayscale,
  palette, RGBA) decodes the same way in both: high bit-depth and float
  images are scaled to 8 bits (`to_8bit`), every other mode is converted to
  RGB (alpha dropped, like torchvision's ImageFolder loader).

  Args:
    encoded: the file's bytes, or a decoded uint8 array [H, W, C] (mocked tfds).
    reduce_to: (width, height) -> the smallest size to keep, or None: a JPEG is
      then decoded at the reduced DCT scale that still covers it (`draft`).
  Raises:
    One of DECODE_ERRORS for an unreadable file.
  """
  if isinstance(encoded, np.ndarray) and encoded.dtype == np.uint8 and encoded.ndim == 3:
    image = Image.fromarray(encoded if encoded.shape[-1] == 3 else encoded[..., 0])
  else:
    image = Image.open(io.BytesIO(bytes(encoded)))
  size = image.size
  if reduce_to is not None and image.format == 'JPEG':
    target = reduce_to(*size)
    if target:
      image.draft('RGB', target)
  image.load()
  image = to_8bit(image)
  if image.mode != 'RGB':
    image = image.convert('RGB')
  return image, size


def fit_square(image: Image.Image, side: int) -> np.ndarray:
  """Resizes the shorter side to `side` and keeps the centre square, as uint8 RGB.

  One `resize(box=...)` call crops and resizes together, which is both faster
  and sharper than resizing the whole image first. Smaller images are upscaled.
  High bit-depth and float images are scaled to 8 bits first (`to_8bit`).
  """
  image = to_8bit(image)
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

  `load_rgb` decodes (the streaming loader's decoder too); JPEGs much larger
  than `side` are decoded at a reduced DCT scale (`draft`), which is several
  times faster and still leaves the shorter side >= `side`.
  """
  _why.too_large = None
  try:
    image, _ = load_rgb(data, reduce_to=lambda w, h: (side, side))
    return fit_square(image, side)
  except Image.DecompressionBombError as e:
    found = re.search(r'\((\d+) pixels\)', str(e))
    _why.too_large = f'{found.group(1) if found else "?"} pixels'
    return None
  except DECODE_ERRORS:
    return None


def decode_value(value, side: int) -> Optional[np.ndarray]:
  """`decode_image` of encoded bytes, or `fit_square` of an already decoded uint8 array.

  Sources hand out encoded bytes (folders, tfds with SkipDecoding) or, for a
  mocked tfds dataset, decoded arrays; both end as uint8 [side, side, 3].
  """
  if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3:
    image = value if value.shape[-1] == 3 else np.repeat(value[..., :1], 3, axis=-1)
    return fit_square(Image.fromarray(image), side)
  return decode_image(bytes(value), side)


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
      _why.too_large = None
      decoded[name] = decode(data, side)
      if decoded[name] is None and _why.too_large:
        _TOO_LARGE[name] = _why.too_large

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
  first = next((a for a in decoded.values() if a is not None), None)
  channels = first.shape[-1] if first is not None else 3  # data.channels (moco_jax.data.channels).
  images = np.zeros((len(names), side, side, channels), np.uint8)
  ok = np.zeros((len(names),), bool)
  for i, name in enumerate(names):
    array = decoded.pop(name, None)
    if array is not None:
      images[i], ok[i] = array, True
  return images, ok


def keep_decoded(images, labels, ok, names, where):
  """Drops undecodable files, warning once with their count."""
  bad_names = [names[i] for i in np.flatnonzero(~ok)]
  large = {n: _TOO_LARGE.pop(n) for n in bad_names if n in _TOO_LARGE}
  other = [n for n in bad_names if n not in large]
  too_large = (f'{len(large)} of {len(names)} files in {where} are larger than the decoder\'s '
               f'limit of {max_image_pixels()} pixels, e.g. '
               f'{[f"{n} ({p})" for n, p in list(large.items())[:3]]}: raise '
               '--config.data.max_image_pixels (-1: no limit) if they are real images')
  if large and ok.any():
    logging.warning('Skipped %s.', too_large)
  if other:
    logging.warning('Skipped %d of %d files in %s that are not readable images '
                    '(truncated, corrupt or another format), e.g. %s.',
                    len(other), len(names), where, other[:3])
  bad = len(bad_names)
  if not ok.any():
    if large:
      raise errors.DataError(f'No image of {where} decoded: {too_large}.')
    raise errors.DataError(f'No readable image in {where}: all {len(names)} files failed to decode.')
  if bad:
    images, labels = images[ok], labels[ok]
  return images, labels
