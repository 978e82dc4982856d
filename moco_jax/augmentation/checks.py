"""`config.aug` checks: the ranges the two views' ops (`augment.py`) can draw from."""

from moco_jax.core import checks

PREFIX = 'config.aug.'


def _is_auto(value) -> bool:
  """'auto' (or ('auto',)): computed from the train split when the run starts."""
  return value == 'auto' or (isinstance(value, (tuple, list)) and list(value) == ['auto'])


def check_config(aug, channels: int = 3) -> None:
  """ConfigError naming the first field of `config.aug` the augmentation cannot use.

  `channels` is the images' channel count (`data.channels`): one mean and std each.
  """
  check = lambda field, ok, rule, hint='': checks.check(aug, field, ok, rule, hint, prefix=PREFIX)
  check('crop_scale', checks.pair(lambda lo: lo > 0, lambda hi: hi <= 1),
        'must be (min, max) with 0 < min <= max <= 1', 'area fraction of RandomResizedCrop')
  check('crop_ratio', checks.pair(lambda lo: lo > 0),
        'must be (min, max) with 0 < min <= max', 'aspect ratio of RandomResizedCrop')
  check('blur_sigma', checks.pair(lambda lo: lo > 0), 'must be (min, max) with 0 < min <= max')
  check('jitter', lambda v: (len(v) == 4 and all(checks.number(x) and x >= 0 for x in v)
                             and v[3] <= 0.5),
        'must be (brightness, contrast, saturation, hue), each >= 0 and hue <= 0.5')
  for field in ('jitter_prob', 'grayscale_prob', 'blur_prob', 'solarize_prob'):
    check(field, checks.probability, 'must be a probability in [0, 1]')
  for field in ('second_view_blur_prob', 'second_view_solarize_prob'):
    check(field, lambda v: v == -1 or checks.probability(v),
          'must be -1 (as the first view) or a probability in [0, 1]')
  check('flip', checks.flag, 'must be True or False')
  per_channel = ('R, G, B' if channels == 3 else
                 f"one per channel of data.channels={channels}, or 'auto' to compute them")
  check('mean', lambda v: _is_auto(v) or (
      not isinstance(v, str) and len(v) == channels and all(checks.number(x) for x in v)),
        f'must be {channels} numbers ({per_channel})')
  check('std', lambda v: _is_auto(v) or (
      not isinstance(v, str) and len(v) == channels and all(checks.number(x) and x > 0 for x in v)),
        f'must be {channels} numbers > 0 ({per_channel})')
