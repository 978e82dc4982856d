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

import difflib
import logging as std_logging
import os
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from moco_jax import errors
from moco_jax import export
from moco_jax import knn
from moco_jax import linear_probe
from moco_jax import report
from moco_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
flags.DEFINE_enum('mode', 'train', ['train', 'knn', 'linear_eval', 'export', 'report'], 'What to run.')
flags.DEFINE_bool('distributed', False,
                  'Call jax.distributed.initialize() first (multi-host GPU/TPU runs).')
config_flags.DEFINE_config_file('config', None, 'Experiment configuration file.',
                                lock_config=True)
flags.DEFINE_bool('verbose', False,
                  'On an error, print the Python traceback as well as the one-line message.')
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietOrbax(std_logging.Filter):
  """Orbax logs every array transfer at INFO; keep its warnings only."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or 'orbax' not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  logging.get_absl_handler().addFilter(_QuietOrbax())
  if FLAGS.distributed:
    jax.distributed.initialize()
  logging.info('JAX process %d / %d, %d devices: %s', jax.process_index(), jax.process_count(),
               jax.device_count(), jax.devices()[:8])
  with _one_message_on_user_errors():
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


# --------------------------------------------------------------------------
# Errors a user can cause end in one message and a non-zero exit (no traceback
# unless --verbose).


def _verbose(argv=None) -> bool:
  argv = sys.argv if argv is None else argv
  return any(a in ('--verbose', '--verbose=true', '--verbose=True') for a in argv)


def _fail(kind: str, message: str, argv=None):
  """Prints 'Error (<kind>): <message>' (+ the traceback with --verbose) and exits."""
  if _verbose(argv):
    traceback.print_exc()
  message = ' '.join(str(message).split())  # One line, however the message was built.
  print(f'Error ({kind}): {message}', file=sys.stderr, flush=True)
  sys.stdout.flush()
  # Not sys.exit: interpreter teardown with Orbax/TensorStore objects still alive can
  # print a stray 'Event loop is closed' traceback after the message. Pending saves of
  # good checkpoints were waited for before the error was raised (guard.Guard).
  os._exit(errors.EXIT_CODE)  # pylint: disable=protected-access


class _one_message_on_user_errors:  # pylint: disable=invalid-name
  """Turns the project's UserError types into one message; anything else is a bug."""

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is not None and issubclass(exc_type, errors.UserError):
      kind = {errors.ConfigError: 'config', errors.DataError: 'data',
              errors.CheckpointError: 'checkpoint', errors.NonFiniteError: 'diverged'}
      name = next((v for k, v in kind.items() if issubclass(exc_type, k)), 'input')
      _fail(name, f'{exc} (rerun with --verbose for the traceback)')
    return False


def _parse_flags(argv):
  """absl's flag parsing, but a bad flag, override or config file is one line."""
  try:
    rest = FLAGS(argv)
    FLAGS.config.get('seed')  # Loads the config file now: a missing one fails here.
    return rest
  except Exception as e:  # pylint: disable=broad-except
    _fail('flags', _flag_error_message(argv, e), argv)


def _flag_error_message(argv, error) -> str:
  """'--config.moco.queue=4: config.moco has no field 'queue'; did you mean ...' or the error."""
  config_arg = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  config = None
  if config_arg:
    try:
      config = config_flags.config_flags.ConfigFileFlagParser(name="config").parse(config_arg)
      config.get('seed')
    except Exception:  # pylint: disable=broad-except
      config = None
  if config_arg and config is None:
    file = config_arg.split(':', 1)[0]
    why = 'no such file' if not os.path.isfile(file) else _first_line(error)
    return (f'--config={config_arg}: could not load it ({why}); pass a config file such as '
            '--config=configs/imagenette.py.')
  for arg in argv[1:]:
    if not arg.startswith('--config.') or config is None:
      continue
    path = arg[len('--config.'):].split('=', 1)[0].split('.')
    node, where = config, 'config'
    for part in path:
      keys = list(node.keys()) if hasattr(node, 'keys') else []
      if part not in keys:
        close = difflib.get_close_matches(part, keys, n=3)
        hint = (f'did you mean {" or ".join(f"--{where}.{c}" for c in close)}?' if close
                else f'its fields: {", ".join(sorted(keys))}.' if keys
                else f'{where} is a value, not a section.')
        return f'{arg}: {where} has no field {part!r}; {hint}'
      node, where = node[part], f'{where}.{part}'
  return _first_line(error)


def _first_line(error) -> str:
  """The telling line of an error: its first, or the last of an embedded traceback."""
  text = str(error).strip()
  if len(text) > 1 and text[0] == text[-1] and text[0] in '"\'':
    text = text[1:-1]
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if any(line.startswith('Traceback') for line in lines):
    lines = lines[-1:]
  return lines[0] if lines else type(error).__name__


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
