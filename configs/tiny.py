"""Tiny MoCo v2 for tests and smoke runs: a 4-block ResNet on 32 px synthetic images.

  python main.py --config=configs/tiny.py --workdir=/tmp/moco_tiny
  python main.py --config=configs/tiny.py:mocov3_vit --workdir=/tmp/mocov3_tiny

Runs in well under a minute on a 2-core CPU. Expected result: none (random
data); it proves the whole path (step, checkpoints, metrics) works.
"""

from configs import default
from configs import mocov3_base


def get_config(variant: str = ''):
  """Tiny model, tiny queue, synthetic data, a few steps; `variant` 'mocov3_resnet' |
  'mocov3_vit' (`--config=configs/tiny.py:mocov3_vit`) gives tiny MoCo v3 instead."""
  if variant:
    variants = {'mocov3_resnet': mocov3_resnet, 'mocov3_vit': mocov3_vit}
    if variant not in variants:
      raise ValueError(f'configs/tiny.py:{variant}: expected one of {sorted(variants)}.')
    return variants[variant]()
  config = default.get_config()
  config.model.name = 'resnet_tiny'
  config.model.stem = 'cifar'
  config.model.width = 8
  config.model.embed_dim = 16
  config.data.source = 'synthetic'
  config.data.image_size = 32
  config.data.synthetic_examples = 256
  config.batch_size = 64
  config.moco.queue_size = 200  # Deliberately not a multiple of the batch.
  config.num_epochs = 2
  config.log_every_steps = 2
  config.checkpoint_every_steps = 4
  config.eval.knn_every_epochs = -1
  return config


def _mocov3(config, family: str):
  """Tiny MoCo v3: the recipe of `family` (configs/mocov3_base.py) on the tiny model and data."""
  mocov3_base.apply(config, family)
  config.batch_size = 64
  config.num_epochs = 2
  config.model.embed_dim = 16
  config.model.mlp_dim = 32
  config.optim.warmup_epochs = 1.0
  if family == 'vit':
    config.model.name = 'vit_tiny'  # Patch 4 on 32 px: 64 tokens of width 16.
  return config


def mocov3_resnet():
  """`--config=configs/tiny.py:mocov3_resnet`: MoCo v3 with the tiny ResNet, LARS, T 1."""
  return _mocov3(get_config(), 'resnet')


def mocov3_vit():
  """`--config=configs/tiny.py:mocov3_vit`: MoCo v3 with a 2-block ViT (patch 4), AdamW, T 0.2."""
  return _mocov3(get_config(), 'vit')
