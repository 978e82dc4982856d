"""MoCo v1 on ImageNet (the first row of the MoCo v2 ablation): 60.6 linear top-1.

  python main.py --config=configs/mocov1.py --workdir=/tmp/moco_v1 \
      --config.data.data_dir=/path/to/tensorflow_datasets

v1 = linear head, T = 0.07, v1 augmentation (crop, grayscale 0.2, jitter 0.4 for
all four always applied, flip; no blur), step lr (x0.1 at epochs 120 and 160).
The other rows are `configs/imagenet_ablation.py:<row>`.
"""

from configs import imagenet_ablation


def get_config():
  return imagenet_ablation.get_config('v1')
