"""MoCo v2 pretraining and evaluation.

  python main.py --config=configs/imagenette.py --workdir=DIR [--config.a.b=value]

This file only parses flags; the work is in `moco_jax.train.train_and_evaluate`,
which tests call too.
"""

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from moco_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
flags.DEFINE_enum('mode', 'train', ['train'], 'What to run.')
config_flags.DEFINE_config_file('config', None, 'Experiment configuration file.',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  logging.info('JAX process %d / %d, devices: %s', jax.process_index(), jax.process_count(),
               jax.devices())
  if FLAGS.mode == 'train':
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
