"""MoCo v2 on ImageNet-1k: the paper's exact recipe (ResNet-50, 200 epochs).

  python main.py --config=configs/imagenet.py --workdir=/tmp/moco_imagenet \
      --config.data.data_dir=/path/to/tensorflow_datasets   # imagenet2012, prepared

Chen et al. 2020 (MoCo v2): R50, MLP head 2048-2048-128, K = 65536, m = 0.999,
T = 0.2, aug+ (with blur), SGD lr 0.03 x batch / 256, momentum 0.9, wd 1e-4,
cosine over 200 epochs, no warm-up, batch 256, Shuffle BN.
Expected: 67.5 +- 0.1 linear top-1 after 200 epochs (71.1 after 800); the
official code needed 53 h on 8 V100.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = 'resnet50'
  config.model.stem = 'imagenet'
  config.model.head = 'mlp'
  config.data.source = 'tfds'
  config.data.name = 'imagenet2012'
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.data.image_size = 224
  config.data.cache_ratio = 256 / 224  # Decoded at 256 px for 224 (follows image_size).
  config.batch_size = 256
  config.num_epochs = 200
  config.moco.queue_size = 65536
  config.moco.temperature = 0.2
  config.moco.momentum = 0.999
  config.optim.base_lr = 0.03
  config.optim.weight_decay = 1e-4
  config.optim.schedule = 'cosine'
  config.eval.knn_every_epochs = -1  # 1.28 M-image kNN is an evaluation of its own.
  config.log_every_steps = 100
  config.checkpoint_every_steps = 2000
  return config
