"""Images with C channels: decoding that keeps them (`data.channels`), never silently.

`data.channels` = 3 (default) is today's RGB path, unchanged: every Pillow
image is converted to RGB (`decode.decode_image`). Any other C keeps the
file's own channels and refuses a file with another count, naming it:

  * 1: single-band images (grayscale PNG/JPEG, 16-bit 'I;16', 32-bit 'I',
    float 'F'), .npy [H, W] or [H, W, 1], single-page TIFF;
  * 4: RGBA images (alpha kept as the 4th channel) and 4-channel arrays;
  * any C: .npy [H, W, C] and TIFF with C samples per pixel (YXS) or C pages /
    planes (CYX, QYX, IYX: moved last), as tifffile reads them.

Values end as uint8 (the store every input path shares): uint8 as is, 16-bit
divided by 257, other integer and float arrays by their range over the whole
image (`decode.to_8bit`'s rules: [0, 1] x255, [0, 255] kept, [0, 65535] /257,
else min-max), NaN 0. Each channel is then resized like the RGB path (shorter
side to S, bilinear, antialiased, centre square), so a 3-channel array decodes
to what Pillow's RGB resize gives.
"""

import io
import os
from typing import Callable, Optional

import numpy as np
from PIL import Image

from moco_jax.core import errors
from moco_jax.data import decode

ARRAY_SUFFIXES = ('.npy',)
TIFF_SUFFIXES = ('.tif', '.tiff')


class ChannelError(errors.DataError):
  """A file whose channel count is not data.channels (a mixed folder, a wrong setting)."""


def to_uint8(array: np.ndarray) -> np.ndarray:
  """An [H, W, C] array of any numeric dtype as uint8, by `decode.to_8bit`'s range rules."""
  if array.dtype == np.uint8:
    return array
  if array.dtype == np.bool_:
    return array.astype(np.uint8) * 255
  return decode.scale_to_uint8(array, array.dtype == np.uint16,
                               np.issubdtype(array.dtype, np.floating))


def _tiff_array(data: bytes) -> np.ndarray:
  """[H, W, C] of a TIFF's first series: samples (S) or pages / planes (C, Q, I, Z) last."""
  import tifffile  # pylint: disable=g-import-not-at-top
  with tifffile.TiffFile(io.BytesIO(data)) as tif:
    series = tif.series[0]
    array, axes = series.asarray(), series.axes
  if array.ndim == 2:
    return array[..., None]
  if array.ndim != 3 or 'Y' not in axes or 'X' not in axes:
    raise ValueError(f'TIFF axes {axes!r} with shape {array.shape}: expected YX plus one '
                     'channel, page or sample axis')
  other = next(i for i, a in enumerate(axes) if a not in 'YX')
  return np.moveaxis(array, other, -1)


def read_array(data: bytes, name: str) -> np.ndarray:
  """The file's pixels as [H, W, C] (any dtype), its own channels kept."""
  suffix = os.path.splitext(name)[1].lower()
  if suffix in ARRAY_SUFFIXES:
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.ndim == 2:
      array = array[..., None]
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.number) and array.dtype != np.bool_:
      raise ValueError(f'a .npy of shape {array.shape} and dtype {array.dtype}: expected a '
                       'numeric [H, W] or [H, W, C] array')
    return array
  if suffix in TIFF_SUFFIXES:
    return _tiff_array(data)
  image = Image.open(io.BytesIO(data))
  image.load()
  array = np.asarray(image)
  if image.mode == 'P':  # A palette is an encoding of colour: its pixels are RGB(A).
    array = np.asarray(image.convert('RGBA' if 'transparency' in image.info else 'RGB'))
  return array[..., None] if array.ndim == 2 else array


def resize_channels(array: np.ndarray, size: tuple, box: Optional[tuple] = None) -> np.ndarray:
  """uint8 [H, W, C] -> [height, width, C] (`size` = (width, height), Pillow's order): each
  channel resized as Pillow resizes an RGB image (bilinear, antialiased), from `box` if given."""
  bands = [np.asarray(Image.fromarray(np.ascontiguousarray(array[..., c]), 'L').resize(
      size, Image.BILINEAR, box=box)) for c in range(array.shape[-1])]
  return np.stack(bands, axis=-1)


def fit_square_channels(array: np.ndarray, side: int) -> np.ndarray:
  """uint8 [H, W, C] -> [side, side, C]: each channel as `decode.fit_square` resizes RGB."""
  height, width = array.shape[:2]
  if (width, height) == (side, side):
    return np.ascontiguousarray(array)
  s = min(width, height)
  left, top = (width - s) // 2, (height - s) // 2
  return resize_channels(array, (side, side), (left, top, left + s, top + s))


def read_uint8(data: bytes, name: str, channels: int) -> Optional[np.ndarray]:
  """uint8 [H, W, channels] of one file at its own size; None if unreadable; ChannelError if
  its channel count is not `channels`."""
  try:
    array = read_array(bytes(data), name)
  except (ValueError, *decode.DECODE_ERRORS):
    return None
  if array.shape[-1] != channels:
    raise ChannelError(
        f'{name} has {array.shape[-1]} channel(s) (shape {list(array.shape)}) but '
        f'data.channels={channels}: every image of a run needs the same count. Remove or '
        f'convert that file, or set --config.data.channels={array.shape[-1]} if all have it '
        '(data.channels=3 converts any Pillow image to RGB).')
  return to_uint8(array)


def decode_channels(data: bytes, name: str, side: int, channels: int) -> Optional[np.ndarray]:
  """uint8 [side, side, channels] of one file; None if unreadable; ChannelError if C differs."""
  array = read_uint8(data, name, channels)
  return None if array is None else fit_square_channels(array, side)


def keeps_channels(name: str, channels: int) -> bool:
  """Whether `name` decodes through this module (its own channels) rather than Pillow's RGB:
  every file when data.channels != 3, array files always."""
  return channels != 3 or name.lower().endswith(ARRAY_SUFFIXES)


def named_decoder(channels: int) -> Callable:
  """(name, bytes, side) -> uint8 [side, side, C] or None, for `data.channels` = `channels`."""
  if channels == 3:
    return lambda name, data, side: _rgb(name, data, side)
  return lambda name, data, side: decode_channels(data, name, side, channels)


def _rgb(name: str, data: bytes, side: int):
  """RGB as today (Pillow, any mode converted); a .npy must have 3 channels (else ChannelError)."""
  if keeps_channels(name, 3):
    return decode_channels(data, name, side, 3)
  return decode.decode_image(data, side)
