"""MoCo v3 on CIFAR-10 (32 px): `:resnet18` (3x3 stem) or `:vit_small` (patch 4, 64 tokens).

  python main.py --config=configs/mocov3_cifar10.py:vit_small --workdir=/tmp/mocov3_c10 \
      --config.data.path=/work/shared/data/CIFAR-10-images.tar.gz   # or tfds cifar10

The v3 recipe of the family (configs/mocov3_base.py) at CIFAR scale: batch 512,
200 epochs (warm-up 10 for both), blur off as the official CIFAR demo does
at 32 px (its kernel would be 3 taps), solarize kept on view 2. No published
reference numbers: docs/mocov3.md has our short-run kNN beside the floor.
"""

from configs import cifar10
from configs import mocov3_base


def get_config(variant: str = 'resnet18'):
  if variant not in ('resnet18', 'vit_small'):
    raise ValueError(f"configs/mocov3_cifar10.py:{variant}: expected 'resnet18' or 'vit_small'.")
  vit = variant.startswith('vit')
  # configs/cifar10.py's data, normalisation and logging; the v3 recipe on top.
  config = mocov3_base.apply(cifar10.get_config(), 'vit' if vit else 'resnet')
  config.model.name = variant
  if vit:
    config.model.patch_size = 4
  config.batch_size = 512
  config.num_epochs = 200
  config.optim.warmup_epochs = 10.0
  config.aug.blur_prob, config.aug.second_view_blur_prob = 0.0, -1.0
  return config
