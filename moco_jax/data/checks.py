"""`config.data` checks: every field the sources, the decoder, the cache and the streamer read.

Called by the composer (`moco_jax.config_checks`) before any work, so that a
value the data modules would refuse (or crash on) deep inside loading is
refused first, naming the field. The source kinds are `spec.SOURCES`.
"""

from moco_jax.core import checks
from moco_jax.data import spec

PREFIX = 'config.data.'


def _check(data, field, ok, rule, hint=''):
  checks.check(data, field, ok, rule, hint, prefix=PREFIX)


def check_config(config) -> None:
  """ConfigError naming the first field of `config.data` that cannot be loaded as asked."""
  data = config.data
  _check(data, 'path', checks.text, "must be a path (a string; '' for none)")
  checks.choice(data, 'source', spec.SOURCES, prefix=PREFIX)
  # source=folder without a path: `spec.from_config` refuses it when the data is opened
  # (the shipped folder configs leave data.path to the command line).
  if data.source == 'tfds' and not data.path:
    _check(data, 'name', checks.nonempty_text, 'must name a tfds dataset',
           "e.g. 'imagenette/160px-v2'")
  for field in ('name', 'data_dir', 'cache_dir'):
    _check(data, field, checks.text, "must be a string ('' for the default)")
  _check(data, 'download', checks.flag, 'must be True or False')
  for field in ('train_split', 'eval_split'):
    _check(data, field, checks.nonempty_text, 'must name a split')
  _check(data, 'image_size', checks.positive_int, 'must be > 0', 'the network input side in pixels')
  _check(data, 'cache_size', lambda v: checks.integer(v) and (v == -1 or v >= data.image_size),
         f'must be -1 (= image_size x cache_ratio) or >= config.data.image_size={data.image_size}',
         'a smaller decoded side would train on upscaled thumbnails')
  _check(data, 'cache_ratio', lambda v: checks.number(v) and v >= 1,
         'must be >= 1', 'the decoded side is round(image_size x cache_ratio) when cache_size=-1')
  _check(data, 'on_device', checks.flag, 'must be True or False')
  _check(data, 'num_workers', checks.positive_int, 'must be >= 1 (decoding threads)')
  _check(data, 'max_in_memory_gb', lambda v: checks.number(v) and (v == -1 or v >= 0),
         'must be >= 0 (GiB), or -1 for 25% of RAM')
  _check(data, 'stream_processes', lambda v: checks.integer(v) and v >= -1,
         'must be an int >= 0, or -1 for one per core but one')
  _check(data, 'stream_crops', lambda v: v in ('device', 'host'),
         "must be 'device' (the step cuts the crops) or 'host' (the loader cuts them)")
  _check(data, 'canvas_side', lambda v: checks.integer(v) and v >= 0,
         'must be >= 1 (px): the side of the canvas each streamed image is decoded into, '
         'or 0 (auto)')
  _check(data, 'decoder', lambda v: v in ('pillow', 'simplejpeg'),
         "must be 'pillow' or 'simplejpeg'")
  checks.choice(data, 'labels', spec.LABEL_MODES, prefix=PREFIX)
  _check(data, 'val_fraction', lambda v: checks.number(v) and 0 <= v < 1,
         'must be in [0, 1)', 'the fraction of images held out as the eval split (0: none)')
  _check(data, 'channels', checks.positive_int,
         'must be >= 1 (1 grayscale, 3 RGB, 4 RGBA, or the channels of your .npy / TIFF files)')
  _check(data, 'pack_side', checks.positive_int,
         'must be > 0 (px): --mode=pack re-encodes each image with its short side at most this')
  _check(data, 'max_image_pixels', lambda v: checks.integer(v) and (v == -1 or v > 0),
         'must be > 0 (pixels), or -1 for no limit', "Pillow's default: 178956970")
  _check(data, 'synthetic_examples', checks.positive_int, 'must be > 0',
         'the size of source=synthetic')
  _check(data, 'synthetic_classes', checks.positive_int, 'must be > 0',
         'the labels of source=synthetic')
