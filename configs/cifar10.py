"""MoCo v2 on CIFAR-10: ResNet-18 with a 3x3 stem, 32 px, as the official CIFAR demo.

  python main.py --config=configs/cifar10.py --workdir=/tmp/moco_cifar10 \
      --config.data.path=../shared/data/CIFAR-10-images.tar.gz   # or online: tfds cifar10

The official demo (colab, 1 V100, ~20 s/epoch): K = 4096, m = 0.99, T = 0.1,
lr 0.06, wd 5e-4, batch 512, cosine, 200 epochs, no blur, Shuffle BN emulated
by 8 BatchNorm splits on one GPU. Expected kNN top-1: 82.6 after 200 epochs
(88.7 after 800); lightly's R18 reached 84.7 after 200 epochs.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = 'resnet18'
  config.model.stem = 'cifar'
  config.data.source = 'tfds'
  config.data.name = 'cifar10'
  config.data.train_split = 'train'
  config.data.eval_split = 'test'
  config.data.image_size = 32
  config.batch_size = 512
  config.num_epochs = 200
  config.moco.queue_size = 4096
  config.moco.temperature = 0.1
  config.moco.momentum = 0.99
  config.moco.bn_splits = -1  # 8 BN groups in total, as the demo's 8 splits.
  config.optim.base_lr = 0.06 * 256 / 512  # The demo's lr 0.06 is for its batch 512.
  config.optim.weight_decay = 5e-4
  config.aug.blur_prob = 0.0  # The demo drops blur at 32 px.
  config.aug.mean = (0.4914, 0.4822, 0.4465)
  config.aug.std = (0.2023, 0.1994, 0.2010)
  config.eval.knn_every_epochs = 10
  config.log_every_steps = 20
  config.checkpoint_every_steps = 500
  return config
