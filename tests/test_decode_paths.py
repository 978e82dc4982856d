"""The in-memory and the streamed input decode an odd file the same way (issue 18).

Both paths go through `decode.load_rgb`; a full-range 16-bit PNG once decoded
to mean 128 in memory and to mean 252 streamed (Pillow's own convert clips
at 255). Each odd image here is decoded by both, with the streamed crop box
covering the whole (square) image, so both resize the same pixels and must
give the same bytes.
"""

import io

import numpy as np
from PIL import Image
import pytest

from moco_jax.data import decode
from moco_jax.data import host_crops

SIDE = 32  # Below half the 48 px images: no reduced JPEG decode on either path.


def _ramp(side=48):
  """A horizontal ramp 0..1 (float64) over a square of `side` pixels."""
  return np.tile(np.linspace(0, 1, side), (side, 1))


def _encode(image: Image.Image, fmt: str) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format=fmt)
  return buf.getvalue()


def _odd_images() -> dict:
  ramp = _ramp()
  rgb = np.stack([ramp, ramp[::-1], ramp.T], -1)
  palette = Image.fromarray((rgb * 255).astype(np.uint8)).convert('P', palette=Image.ADAPTIVE)
  return {
      '16-bit PNG (full range)': _encode(Image.fromarray((ramp * 65535).astype(np.uint16)), 'PNG'),
      'float TIFF in [0, 1]': _encode(Image.fromarray(ramp.astype(np.float32)), 'TIFF'),
      'CMYK JPEG': _encode(Image.fromarray((rgb * 255).astype(np.uint8)).convert('CMYK'), 'JPEG'),
      'grayscale PNG': _encode(Image.fromarray((ramp * 255).astype(np.uint8)), 'PNG'),
      'palette PNG': _encode(palette, 'PNG'),
      'RGBA PNG': _encode(Image.fromarray((np.concatenate([rgb, ramp[..., None]], -1) * 255)
                                          .astype(np.uint8)), 'PNG'),
  }


def _streamed_whole_image(data: bytes) -> np.ndarray:
  """The streaming loader's view with a box of the whole square image (scale 1, ratio 1)."""
  u = np.zeros((2, host_crops.CROP_UNIFORMS), np.float32)
  views = host_crops.two_crops(data, u, SIDE, scale=(1.0, 1.0), ratio=(1.0, 1.0))
  assert views is not None
  np.testing.assert_array_equal(views[0], views[1])
  return views[0]


@pytest.mark.parametrize('name', list(_odd_images()))
def test_streamed_and_in_memory_decode_the_same(name):
  data = _odd_images()[name]
  in_memory = decode.decode_image(data, SIDE)
  assert in_memory is not None and in_memory.shape == (SIDE, SIDE, 3)
  np.testing.assert_array_equal(_streamed_whole_image(data), in_memory)


def test_full_range_images_keep_their_mean():
  """The ramp's mean is 127.5 levels: neither path clips it to white or black."""
  for name in ('16-bit PNG (full range)', 'float TIFF in [0, 1]', 'grayscale PNG'):
    data = _odd_images()[name]
    for image in (decode.decode_image(data, SIDE), _streamed_whole_image(data)):
      # Bilinear resizing of a linear ramp keeps its mean up to rounding (<= 1 level).
      assert abs(float(image.mean()) - 127.5) <= 1.0, name
