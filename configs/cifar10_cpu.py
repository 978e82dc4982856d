"""MoCo v2 on CIFAR-10 in about 10 minutes on a laptop CPU: the first thing to try.

  python main.py --config=configs/cifar10_cpu.py --workdir=/tmp/moco_cifar_cpu \
      --config.data.path=../shared/data/CIFAR-10-images.tar.gz   # or online: tfds cifar10

A tiny ResNet (one BasicBlock per stage, 3x3 stem, width 16, 128-d features)
with the official CIFAR demo's MoCo settings (K = 4096, m = 0.99, T = 0.1,
weight decay 5e-4, no blur), batch 128, lr 0.03, cosine over 2 epochs (780
steps), the kNN monitor after each epoch. Not a recipe for a good encoder
(see configs/cifar10.py for that): a check that pretraining learns something
on real data, on the hardware at hand.

Expected (measured here, docs/results.md): kNN top-1 41.8 after epoch 1 and
44.3 after epoch 2, against 32.7 for the random-init encoder (`--mode=knn
--workdir=DIR --config.eval.random_init=True`): +11.6 points; its times are in
docs/results.md. The training loss falls to ~5.7 and rises back to ~6.4 in the last quarter as the
lr goes to 0 (README: "The loss curve").
"""

from configs import cifar10


def get_config():
  config = cifar10.get_config()
  config.model.name = 'resnet_tiny'
  config.model.width = 16
  config.batch_size = 128
  config.num_epochs = 2
  config.optim.base_lr = 0.06  # lr = 0.06 x 128 / 256 = 0.03, the demo's 0.06 at batch 512 halved.
  config.eval.knn_every_epochs = 1
  config.log_every_steps = 20
  config.checkpoint_every_steps = 200
  return config
