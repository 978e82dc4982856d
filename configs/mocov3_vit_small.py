"""MoCo v3, ViT-S/16 on ImageNet-1k: the paper's recipe (CONFIG.md, 300 epochs).

  python main.py --config=configs/mocov3_vit_small.py --workdir=/tmp/mocov3_vit_small \
      --config.data.data_dir=/path/to/tensorflow_datasets   # imagenet2012, prepared

AdamW lr 1.5e-4 x batch / 256, wd 0.1, 40 warm-up epochs then half-cosine,
T 0.2, m 0.99 -> 1 (cosine), batch 4096, crop min 0.08, frozen random patch
projection (stop_grad_conv1), fixed 2-D sin-cos position embedding; projector
3 layers, predictor 2 (4096 hidden, 256 out). Paper linear top-1: 73.2.
"""

from configs import mocov3_base


def get_config():
  return mocov3_base.on_imagenet('vit_small')
