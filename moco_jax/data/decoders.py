"""Which library decodes a streamed JPEG: Pillow (the default) or simplejpeg (`data.decoder`).

Both wrap libjpeg-turbo with its accurate integer DCT and fancy upsampling,
and a DCT-scaled decode (Pillow's `draft`) is asked for with the same factor,
so they give the same pixels (`tests/test_device_crops.py` compares them on
baseline and progressive JPEGs, 4:4:4 / 4:2:2 / 4:2:0 and grayscale, at every
scale). simplejpeg skips Pillow's Python-level file parsing and its image
object. Anything simplejpeg does not take as it is (not a JPEG, CMYK / YCCK,
an arbitrary array, a file it refuses) goes to Pillow (`decode.load_rgb`), so
odd files decode exactly as on the in-memory path.

Worker processes of the streaming loader import this module: no JAX here.
"""

from typing import Callable, Optional

import numpy as np
from PIL import Image

from moco_jax.data import decode

DECODERS = ('pillow', 'simplejpeg')
# JPEG colour spaces simplejpeg converts to RGB as Pillow does.
_SIMPLE_COLORSPACES = ('YCbCr', 'Gray', 'RGB')


def draft_scale(width: int, height: int, target) -> int:
  """The DCT scale (1, 2, 4, 8) Pillow's JPEG `draft(mode, target)` picks for a width x height image.

  Pillow's rule (JpegImagePlugin.draft): the largest power of two <= both
  width // target_w and height // target_h; the decoded size is then the
  size divided by it, rounded up.
  """
  scale = min(width // max(1, target[0]), height // max(1, target[1]))
  for s in (8, 4, 2):
    if scale >= s:
      return s
  return 1


def _simplejpeg_rgb(data: bytes, reduce_to: Optional[Callable]):
  """(uint8 [h, w, 3], (width, height)) from simplejpeg, or None: let Pillow decode it."""
  import simplejpeg  # pylint: disable=g-import-not-at-top
  if not simplejpeg.is_jpeg(data):
    return None
  try:
    height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    if colorspace not in _SIMPLE_COLORSPACES:
      return None
    scale = 1
    if reduce_to is not None:
      target = reduce_to(width, height)
      if target:
        scale = draft_scale(width, height, target)
    array = simplejpeg.decode_jpeg(data, 'rgb', min_factor=scale,
                                   min_width=-(-width // scale), min_height=-(-height // scale))
  except (ValueError, RuntimeError, OSError):
    return None  # Truncated or unusual: Pillow decodes it (or reports it unreadable).
  return array, (width, height)


def load_rgb_array(encoded, reduce_to: Optional[Callable] = None, decoder: str = 'pillow'):
  """(uint8 RGB [h, w, 3], original (width, height)): `decode.load_rgb` as an array.

  `reduce_to` as `decode.load_rgb` (a JPEG is decoded at the DCT scale that
  still covers the size it returns). Raises one of `decode.DECODE_ERRORS`
  for an unreadable file.
  """
  if decoder == 'simplejpeg' and not isinstance(encoded, np.ndarray):
    decoded = _simplejpeg_rgb(bytes(encoded), reduce_to)
    if decoded is not None:
      return decoded
  image, size = decode.load_rgb(encoded, reduce_to)
  with image:
    return np.asarray(image), size


def load_rgb(encoded, reduce_to: Optional[Callable] = None, decoder: str = 'pillow'):
  """`decode.load_rgb` ((Pillow RGB image, original (width, height))) through `decoder`."""
  if decoder == 'simplejpeg' and not isinstance(encoded, np.ndarray):
    decoded = _simplejpeg_rgb(bytes(encoded), reduce_to)
    if decoded is not None:
      return Image.fromarray(decoded[0]), decoded[1]
  return decode.load_rgb(encoded, reduce_to)
