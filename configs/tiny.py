"""Tiny MoCo v2 for tests and smoke runs: a 4-block ResNet on 32 px synthetic images.

  python main.py --config=configs/tiny.py --workdir=/tmp/moco_tiny

Runs in well under a minute on a 2-core CPU. Expected result: none (random
data); it proves the whole path (step, checkpoints, metrics) works.
"""

from configs import default


def get_config():
  """Tiny model, tiny queue, synthetic data, a few steps."""
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
