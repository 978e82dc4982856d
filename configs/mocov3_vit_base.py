"""MoCo v3, ViT-B/16 on ImageNet-1k: configs/mocov3_vit_small.py's recipe with ViT-B (dim 768).

  python main.py --config=configs/mocov3_vit_base.py --workdir=/tmp/mocov3_vit_base \
      --config.data.data_dir=/path/to/tensorflow_datasets   # imagenet2012, prepared

Paper linear top-1: 76.7 (ViT-S: 73.2).
"""

from configs import mocov3_base


def get_config():
  return mocov3_base.on_imagenet('vit_base')
