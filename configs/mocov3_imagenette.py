"""MoCo v3 on Imagenette (128 px): `:resnet50` or `:vit_small` (patch 16, 64 tokens).

  python main.py --config=configs/mocov3_imagenette.py:vit_small --workdir=/tmp/mocov3_inette

The v3 recipe of the family (configs/mocov3_base.py) on configs/imagenette.py's
data: batch 256, 200 epochs, 10 warm-up.
"""

from configs import imagenette
from configs import mocov3_base


def get_config(variant: str = 'resnet50'):
  if variant not in ('resnet50', 'vit_small'):
    raise ValueError(f"configs/mocov3_imagenette.py:{variant}: expected 'resnet50' or "
                     "'vit_small'.")
  config = mocov3_base.apply(imagenette.get_config(), 'vit' if variant.startswith('vit') else 'resnet')
  config.model.name = variant
  config.batch_size = 256
  config.num_epochs = 200
  config.optim.warmup_epochs = 10.0
  return config
