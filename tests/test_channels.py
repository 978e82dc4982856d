"""Decoding that keeps C channels (data.channels): TIFF, .npy, grayscale, RGBA; refusals."""

import io

import numpy as np
from PIL import Image
import pytest
import tifffile

from moco_jax.data import channels
from moco_jax.data import decode


def _tiff(array, **kwargs):
  buf = io.BytesIO()
  tifffile.imwrite(buf, array, **kwargs)
  return buf.getvalue()


def _npy(array):
  buf = io.BytesIO()
  np.save(buf, array)
  return buf.getvalue()


def _png(array, mode=None):
  buf = io.BytesIO()
  Image.fromarray(array, mode).save(buf, format='PNG')
  return buf.getvalue()


RNG = np.random.default_rng(0)
U16 = RNG.integers(0, 65536, (20, 26, 4), dtype=np.uint16)


@pytest.mark.parametrize('layout', ['samples', 'pages', 'planar'])
def test_a_16_bit_4_channel_tiff_keeps_its_channels_in_every_layout(layout):
  if layout == 'samples':
    data = _tiff(U16, photometric='minisblack', planarconfig='contig')
  elif layout == 'pages':
    data = _tiff(np.moveaxis(U16, -1, 0), photometric='minisblack')
  else:
    data = _tiff(np.moveaxis(U16, -1, 0), photometric='minisblack', planarconfig='separate')
  out = channels.decode_channels(data, 'x.tif', 20, 4)
  assert out.shape == (20, 20, 4) and out.dtype == np.uint8
  # Reference: /257 and round, then Pillow's 'L' resize of each band over the centre box.
  want = np.clip(np.rint(U16 / 257.0), 0, 255).astype(np.uint8)[:, 3:23]
  np.testing.assert_array_equal(out, want)  # 20 x 20 centre: no resampling, exact.


def test_float_npy_with_13_channels_is_scaled_by_its_range_and_resized_per_band():
  array = RNG.random((30, 40, 13)).astype(np.float32)  # In [0, 1]: x 255.
  out = channels.decode_channels(_npy(array), 'a.npy', 16, 13)
  assert out.shape == (16, 16, 13)
  u8 = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
  for c in (0, 7, 12):
    band = Image.fromarray(u8[..., c], 'L').resize((16, 16), Image.BILINEAR, box=(5, 0, 35, 30))
    np.testing.assert_array_equal(out[..., c], np.asarray(band))


def test_three_channels_resized_per_band_equal_pillows_rgb_resize():
  rgb = RNG.integers(0, 256, (33, 47, 3), dtype=np.uint8)
  np.testing.assert_array_equal(channels.fit_square_channels(rgb, 17),
                                decode.fit_square(Image.fromarray(rgb), 17))


def test_grayscale_and_rgba_keep_one_and_four_channels():
  gray = RNG.integers(0, 256, (24, 24), dtype=np.uint8)
  np.testing.assert_array_equal(channels.decode_channels(_png(gray), 'g.png', 24, 1)[..., 0], gray)
  rgba = RNG.integers(0, 256, (24, 24, 4), dtype=np.uint8)
  np.testing.assert_array_equal(channels.decode_channels(_png(rgba, 'RGBA'), 'a.png', 24, 4),
                                rgba)
  g16 = (gray.astype(np.uint16) * 257)
  np.testing.assert_array_equal(
      channels.decode_channels(_png(g16), 'g16.png', 24, 1)[..., 0], gray)


@pytest.mark.parametrize('name,data,wanted,found', [
    ('rgb.png', _png(np.zeros((8, 8, 3), np.uint8)), 1, 3),
    ('gray.png', _png(np.zeros((8, 8), np.uint8)), 4, 1),
    ('a.npy', _npy(np.zeros((8, 8, 12), np.float32)), 13, 12),
    ('t.tif', _tiff(U16, photometric='minisblack', planarconfig='contig'), 3, 4),
])
def test_another_channel_count_is_one_clear_error_naming_the_file(name, data, wanted, found):
  decode_fn = channels.named_decoder(wanted)
  if name.endswith('.tif') and wanted == 3:
    # data.channels=3 is the RGB path: Pillow cannot convert a 16-bit 4-sample TIFF -> unreadable.
    assert decode_fn(name, data, 8) is None
    return
  with pytest.raises(channels.ChannelError) as raised:
    decode_fn(name, data, 8)
  message = str(raised.value)
  assert name in message and f'has {found} channel' in message
  assert f'--config.data.channels={found}' in message


def test_unreadable_files_are_none_not_errors():
  assert channels.decode_channels(b'not an image', 'x.png', 8, 1) is None
  assert channels.decode_channels(b'not an array', 'x.npy', 8, 13) is None


def test_rgb_run_keeps_todays_decoder():
  data = _png(RNG.integers(0, 256, (20, 30), dtype=np.uint8))  # Grayscale -> RGB, as before.
  np.testing.assert_array_equal(channels.named_decoder(3)('g.png', data, 12),
                                decode.decode_image(data, 12))


# --------------------------------------------------------------------------
# Augmentation and normalisation of C channels.


def test_channel_jitter_matches_a_numpy_reference():
  import jax  # pylint: disable=g-import-not-at-top
  from moco_jax.augmentation import augment  # pylint: disable=g-import-not-at-top
  key = jax.random.PRNGKey(3)
  x = RNG.random((9, 7, 13)).astype(np.float32)
  got = np.asarray(augment.channel_jitter(key, x, 0.4, 1.5))
  u = np.asarray(jax.random.uniform(key, (2, 13), np.float32), np.float64)
  b = 0.6 + 0.8 * u[0]
  c = 0.0 + 2.5 * u[1]  # max(0, 1 - 1.5) = 0 .. 2.5
  want = np.clip(x * b, 0, 1)
  want = np.clip(c * want + (1 - c) * want.mean(axis=(0, 1)), 0, 1)
  np.testing.assert_allclose(got, want, atol=1e-6)  # float32 ops on [0, 1] values.


@pytest.mark.parametrize('num_channels', [1, 4, 13])
def test_two_views_of_c_channel_images_keep_c_and_differ(num_channels):
  import jax  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  from moco_jax.augmentation import augment  # pylint: disable=g-import-not-at-top
  aug = default.get_config().aug
  with aug.ignore_type():
    aug.mean, aug.std = (0.5,) * num_channels, (0.25,) * num_channels
  images = RNG.integers(0, 256, (4, 20, 20, num_channels), dtype=np.uint8)
  q, k = augment.two_views(jax.random.PRNGKey(0), images, np.arange(4), aug, 16)
  assert q.shape == k.shape == (4, 16, 16, num_channels)
  assert np.isfinite(np.asarray(q)).all() and not np.allclose(q, k)


def test_auto_normalisation_is_the_sample_mean_and_std_per_channel():
  from moco_jax.data import normalisation  # pylint: disable=g-import-not-at-top
  images = RNG.integers(0, 256, (6, 5, 5, 13), dtype=np.uint8)
  images[..., 4] = 77  # A constant channel: std raised to MIN_STD, not 0.
  mean, std = normalisation.channel_stats(images)
  flat = images.reshape(-1, 13) / 255.0
  np.testing.assert_allclose(mean, flat.mean(axis=0), atol=5e-7)  # Rounded to 6 decimals.
  np.testing.assert_allclose(std[:4] + std[5:], list(np.delete(flat.std(axis=0), 4)), atol=5e-7)
  assert std[4] == normalisation.MIN_STD
  assert normalisation.is_auto('auto') and normalisation.is_auto(('auto',))
  assert not normalisation.is_auto((0.5,))
