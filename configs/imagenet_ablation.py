"""The MoCo v2 ablation (Table 1 of Chen et al. 2020), ResNet-50, 200 ImageNet epochs.

  python main.py --config=configs/imagenet_ablation.py:mlp,aug+ --workdir=DIR

The argument after ':' names the row: 'v1' or a comma list of the v2
improvements added to v1 ('mlp', 'aug+', 'cos'). Expected linear top-1:
  v1 60.6 | mlp 66.2 | aug+ 63.4 | mlp,aug+ 67.3 | mlp,aug+,cos 67.5 (= MoCo v2).
'mlp' also switches T from 0.07 to 0.2, as the paper does for the MLP rows.
"""

from configs import imagenet

_IMPROVEMENTS = ('mlp', 'aug+', 'cos')


def get_config(row: str = 'mlp,aug+,cos'):
  parts = [] if row in ('v1', '') else [p.strip() for p in row.split(',')]
  unknown = [p for p in parts if p not in _IMPROVEMENTS]
  if unknown:
    raise ValueError(f'Ablation row {row!r}: unknown {unknown}; use v1 or a comma list of '
                     f'{list(_IMPROVEMENTS)}.')
  config = imagenet.get_config()
  # MoCo v1 baseline.
  config.model.head = 'linear'
  config.moco.temperature = 0.07
  config.aug.crop_scale = (0.2, 1.0)
  config.aug.jitter = (0.4, 0.4, 0.4, 0.4)
  config.aug.jitter_prob = 1.0
  config.aug.blur_prob = 0.0
  config.optim.schedule = 'step'
  config.optim.step_epochs = (120, 160)
  if 'mlp' in parts:
    config.model.head = 'mlp'
    config.moco.temperature = 0.2
  if 'aug+' in parts:
    config.aug.jitter = (0.4, 0.4, 0.4, 0.1)
    config.aug.jitter_prob = 0.8
    config.aug.blur_prob = 0.5
  if 'cos' in parts:
    config.optim.schedule = 'cosine'
  return config
