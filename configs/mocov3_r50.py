"""MoCo v3, ResNet-50 on ImageNet-1k: the paper's recipe (CONFIG.md, 100 epochs).

  python main.py --config=configs/mocov3_r50.py --workdir=/tmp/mocov3_r50 \
      --config.data.data_dir=/path/to/tensorflow_datasets   # imagenet2012, prepared

LARS (no decay or trust ratio for 1-d params, trust 0.001, momentum 0.9), lr
0.6 x batch / 256, wd 1e-6, T 1.0, m 0.99 -> 1 (cosine), 10 warm-up epochs
then half-cosine, batch 4096, crop min 0.2, SyncBN, zero-init residual.
300 / 1000 epochs: --config.optim.base_lr=0.3 --config.num_epochs=300 (1000:
also --config.optim.weight_decay=1.5e-6 --config.mocov3.momentum=0.996).
Paper linear top-1: 68.9 / 72.8 / 74.6 (100 / 300 / 1000 epochs), on 16 V100.
"""

from configs import mocov3_base


def get_config():
  return mocov3_base.on_imagenet('resnet50')
