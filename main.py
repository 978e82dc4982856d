"""MoCo v2 pretraining and evaluation.

  python main.py --config=configs/imagenette.py --workdir=DIR [--config.a.b=value]
  python main.py --mode=knn|linear_eval|export|report --config=... --workdir=DIR

--mode=train pretrains (with the kNN monitor); knn and linear_eval evaluate the
latest checkpoint of DIR (or, with --config.eval.random_init=True, the step-0
encoder: the floor) and merge their results into DIR/eval.json; export writes
DIR/backbone_torchvision.npz; report writes DIR/report/index.html (curves,
t-SNE, nearest neighbours, augmentations, confusion matrix) for the latest
checkpoint. This file only parses flags; the work is in `moco_jax.train`,
`moco_jax.knn`, `moco_jax.linear_probe`, `moco_jax.export` and
`moco_jax.report`, which tests call too.
"""

import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from moco_jax import config_checks
from moco_jax import distributed
from moco_jax import export
from moco_jax import knn
from moco_jax import linear_probe
from moco_jax import report
from moco_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
flags.DEFINE_enum('mode', 'train', ['train', 'knn', 'linear_eval', 'export', 'report'], 'What to run.')
flags.DEFINE_bool('distributed', False,
                  'Call jax.distributed.initialize() first (many processes/hosts). Without the '
                  'three flags below, the cluster is auto-detected (SLURM, Open MPI, TPU pods).')
flags.DEFINE_string('coordinator_address', None,
                    'host:port of process 0\'s coordination service (implies --distributed).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (implies --distributed).')
flags.DEFINE_integer('process_id', None, 'Index of this process, 0..num_processes-1 '
                     '(implies --distributed).')
flags.DEFINE_integer('heartbeat_timeout_seconds', 100,
                     'A process that sends no heartbeat for this long is declared dead and every '
                     'other process exits (jax.distributed).')
flags.DEFINE_integer('cpu_devices', None,
                     'Simulated CPU devices of this process (jax_num_cpu_devices; tests and '
                     'laptops: --cpu_devices=4 with 2 processes is an 8-device mesh).')
flags.DEFINE_integer('initialization_timeout', 300,
                     'Seconds to wait for all processes to connect (jax.distributed).')
config_flags.DEFINE_config_file('config', None, 'Experiment configuration file.',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietOrbax(std_logging.Filter):
  """Orbax logs every array transfer at INFO; keep its warnings only."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or 'orbax' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  logging.get_absl_handler().addFilter(_QuietOrbax())
  if FLAGS.cpu_devices is not None:
    jax.config.update('jax_num_cpu_devices', FLAGS.cpu_devices)
  explicit = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if FLAGS.distributed or any(v is not None for v in explicit):
    distributed.initialize(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
        heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds,
        initialization_timeout=FLAGS.initialization_timeout)
  logging.info('JAX process %d / %d, %d devices: %s', jax.process_index(), jax.process_count(),
               jax.device_count(), jax.devices()[:8])
  try:
    if FLAGS.mode == 'train':
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    elif FLAGS.mode == 'knn':
      logging.info('Results: %s', knn.run_knn(FLAGS.config, FLAGS.workdir))
    elif FLAGS.mode == 'linear_eval':
      logging.info('Results: %s', linear_probe.run_linear_eval(FLAGS.config, FLAGS.workdir))
    elif FLAGS.mode == 'export':
      logging.info('Wrote %s.', export.run_export(FLAGS.config, FLAGS.workdir))
    elif FLAGS.mode == 'report':
      logging.info('Wrote %s.', report.run_report(FLAGS.config, FLAGS.workdir))
  except config_checks.ConfigError as e:
    sys.exit(f'Config error: {e}')


if __name__ == '__main__':
  app.run(main)
