"""`config.aug` checks: the ranges the two views' ops (`augment.py`) can draw from."""

from moco_jax.core import checks

PREFIX = 'config.aug.'


def check_config(aug) -> None:
  """ConfigError naming the first field of `config.aug` the augmentation cannot use."""
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
  check('mean', lambda v: len(v) == 3 and all(checks.number(x) for x in v),
        'must be 3 numbers (R, G, B)')
  check('std', lambda v: len(v) == 3 and all(checks.number(x) and x > 0 for x in v),
        'must be 3 numbers > 0 (R, G, B)')
