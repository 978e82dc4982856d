"""`config.eval`, `config.report`, `config.export` and `config.embed` checks, before the pretraining run.

A bad evaluation value is refused before pretraining, not after it. The
protocols, schedules and formats are the lists their modules hold.
"""

from moco_jax.core import checks
from moco_jax.evaluation import embed
from moco_jax.evaluation import export
from moco_jax.evaluation import linear_probe

PROTOCOLS = linear_probe.PROTOCOLS + ('paper',)  # paper: linear_paper.py.


def check_config(config) -> None:
  """ConfigError naming the first field of the eval, report or export section that cannot work."""
  ev = config.eval
  check = lambda field, ok, rule, hint='': checks.check(ev, field, ok, rule, hint,
                                                         prefix='config.eval.')
  positive = lambda v: checks.number(v) and v > 0
  checks.choice(ev, 'linear_protocol', PROTOCOLS, prefix='config.eval.')
  checks.choice(ev, 'linear_schedule', linear_probe.SCHEDULES, prefix='config.eval.')
  check('knn_every_epochs', lambda v: checks.number(v) and (v >= 0 or v == -1),
        'must be > 0 (period in epochs), 0 (only at the end) or -1 (never)')
  check('knn_k', checks.positive_int, 'must be > 0', 'paper: 200')
  check('knn_temperature', positive, 'must be > 0', 'paper: 0.1')
  check('batch_size', checks.positive_int, 'must be > 0')
  check('linear_lrs', lambda v: len(v) >= 1 and all(positive(x) for x in v),
        'must be one or more lrs > 0', 'the standardized protocol sweeps them')
  check('linear_holdout', lambda v: checks.number(v) and 0 < v < 1, 'must be in (0, 1)',
        'the fraction of the train split the lr sweep holds out')
  check('linear_epochs', checks.positive_int, 'must be > 0', 'paper: 100')
  check('linear_lr', positive, 'must be > 0', 'paper: 30')
  check('linear_batch_size', checks.positive_int, 'must be > 0')
  check('linear_step_epochs', checks.ascending, 'must be ascending epochs >= 0')
  check('linear_weight_decay', lambda v: checks.number(v) and v >= 0, 'must be >= 0')
  check('linear_crop_scale', checks.pair(lambda lo: lo > 0, lambda hi: hi <= 1),
        'must be (min, max) with 0 < min <= max <= 1', 'paper: (0.08, 1.0)')
  check('linear_center_crop', lambda v: checks.number(v) and 0 < v <= 1,
        'must be in (0, 1]', 'paper: 224 / 256')
  check('random_init', checks.flag, 'must be True or False')
  checks.require(ev.linear_protocol != 'paper' or ev.linear_schedule == 'step',
                 f"config.eval.linear_schedule={ev.linear_schedule!r}: the paper protocol steps "
                 "its lr (x0.1 at eval.linear_step_epochs); set it to 'step'.")
  checks.check(config, 'report.tsne_points', lambda v: checks.integer(v) and v >= 0,
               'must be >= 0', '0: every eval image')
  checks.check(config, 'report.augment_step', lambda v: checks.integer(v) and v >= 0,
               'must be a train step >= 0')
  export.check_format(config.export.format)
  if 'embed' in config:
    checks.choice(config.embed, 'split', embed.SPLITS, prefix='config.embed.')
  checks.check(config, 'init_from', checks.text, "must be a path ('' for none)")
