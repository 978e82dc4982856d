"""The command line of main.py: flags, config source, start-up and one-line errors.

main.py stays a short table of modes (as flax's examples keep theirs); what
every mode shares lives here, where tests import it by public name:
  * `parse_flags`: absl's parsing, with the run's own WORKDIR/config.json as
    the default --config, and any bad flag, override or config file as one line.
  * `run`: CPU devices, jax.distributed, the config's source and overrides,
    `config_checks.validate` for every mode before any work, then the mode,
    with the project's errors as one `Error (<kind>): ...` line and SIGTERM /
    Ctrl-C as exit 75 / 130 in every mode.
"""

import difflib
import logging as std_logging
import os
import re
import shlex
import sys
import traceback
from typing import Callable

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from moco_jax import config_checks
from moco_jax.core import errors
from moco_jax.data import decode
from moco_jax.data import normalisation
from moco_jax.evaluation import results
from moco_jax.run import checkpoints
from moco_jax.run import compile_cache
from moco_jax.run import distributed
from moco_jax.run import run_config
from moco_jax.run import stopping

MODES = ('train', 'knn', 'linear_eval', 'export', 'report', 'embed', 'pack')

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
flags.DEFINE_enum('mode', 'train', MODES, 'What to run.')
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
config_flags.DEFINE_config_file(
    'config', None, 'Experiment configuration file; default: the run\'s own WORKDIR/config.json '
    '(configs/from_workdir.py:WORKDIR) when it exists.', lock_config=True)
flags.DEFINE_bool('verbose', False,
                  'On an error, print the Python traceback as well as the one-line message.')
flags.mark_flags_as_required(['workdir'])

# The config file that reads WORKDIR/config.json (a path, not an import: the
# package does not import configs/).
FROM_WORKDIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            'configs', 'from_workdir.py')


def flag_value(argv, name):
  """The value of --name=V or --name V in raw argv, else None."""
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def with_default_config(argv):
  """argv plus --config=configs/from_workdir.py:WORKDIR when --config is absent and
  WORKDIR/config.json exists (so `--config.a.b=v` overrides apply to the run's own config)."""
  has_config = any(a == '--config' or a.startswith('--config=') for a in argv)
  workdir = flag_value(argv, 'workdir')
  if has_config or not run_config.has_run_config(workdir):
    return argv
  return argv[:1] + [f'--config={FROM_WORKDIR}:{workdir}'] + argv[1:]


def resume_command() -> str:
  """The command line this process was started with (the command that resumes it)."""
  return shlex.join(getattr(sys, 'orig_argv', [sys.executable] + sys.argv))


def report_config():
  """Says where the config came from and what was overridden; warns on a mismatch."""
  overrides = config_flags.get_override_values(FLAGS['config'])
  source = FLAGS['config'].config_filename
  if source.startswith(FROM_WORKDIR):
    source = run_config.config_path(FLAGS.workdir) + ' (the run\'s own config)'
  logging.info('Config: %s%s', source, ''.join(f'\n  override {k} = {v!r}'
                                               for k, v in sorted(overrides.items())))
  if FLAGS.mode not in ('train', 'pack') and not FLAGS['config'].config_filename.startswith(FROM_WORKDIR):
    try:
      diffs = run_config.differences(FLAGS.config, FLAGS.workdir)
    except (OSError, ValueError, KeyError, TypeError) as e:  # An unreadable config.json.
      logging.warning('Could not compare with %s: %s', run_config.config_path(FLAGS.workdir), e)
      diffs = {}
    if diffs:
      logging.warning(
          'The config differs from the pretraining run\'s %s in %s; the evaluation measures '
          'another setting. Leave out --config to use the run\'s own config.',
          run_config.config_path(FLAGS.workdir),
          '; '.join(f'{k}: run {a!r}, now {b!r}' for k, (a, b) in diffs.items()))


class _QuietOrbax(std_logging.Filter):
  """Orbax logs every array transfer at INFO; keep its warnings, without tracebacks.

  A failed save or restore is reported by the project's own line (guard,
  checkpoints); Orbax's logged tracebacks of the same failure (from its
  background threads) are left out unless --verbose.
  """

  def filter(self, record):
    if 'orbax' not in record.pathname:
      return True
    if record.levelno < std_logging.WARNING:
      return False
    if record.exc_info and not FLAGS.verbose:
      record.exc_info, record.exc_text = None, None
      record.msg, record.args = ' '.join(record.getMessage().split())[:300], ()
    return True


def start_up():
  """CPU devices and jax.distributed, as the flags ask; before anything touches a device."""
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


def validate_for_mode(config, mode: str, workdir: str):
  """config_checks.validate before any work, in every mode (and eval.json / workdir checks).

  Training checks against this job's devices and processes; an evaluation may
  run on another machine than the pretraining did, so it checks the values
  alone (as on one device): a batch that fits the training cluster is not
  refused because the laptop has 3 devices.
  """
  if mode == 'train':
    config_checks.validate(config, num_devices=jax.device_count(),
                           process_count=jax.process_count())
  elif mode == 'pack':  # Writes no results: OUT must be empty or a stopped pack (data.pack).
    config_checks.validate(config, num_devices=1, process_count=1)
  else:
    config_checks.validate(config, num_devices=1, process_count=1)
    results.check_before_evaluation(workdir, mode)


def run(argv, modes: dict[str, Callable]):
  """Runs `modes[FLAGS.mode](config, workdir)` with the shared start-up and error handling."""
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  with one_message_on_user_errors():
    if FLAGS.config is not None:  # Before anything compiles.
      compile_cache.enable(FLAGS.config.get('compile_cache_dir', ''))
    start_up()
    if FLAGS.config is None:
      raise errors.ConfigError(
          f'--config is required: {run_config.config_path(FLAGS.workdir)} does not exist yet. '
          'Start a run with --config=configs/<name>.py (e.g. configs/cifar10_cpu.py), or point '
          '--workdir at an existing run.')
    report_config()
    validate_for_mode(FLAGS.config, FLAGS.mode, FLAGS.workdir)
    distributed.check_agreement(  # Many processes: the same command everywhere, first.
        f'--mode={FLAGS.mode}', {**distributed.config_values(FLAGS.config),
                                 'checkpoints': checkpoints.checkpoint_steps(FLAGS.workdir)})
    decode.configure(FLAGS.config)  # data.max_image_pixels, before any image is decoded.
    normalisation.resolve(FLAGS.config)  # aug.mean / std = 'auto': the train split's numbers.
    try:
      if FLAGS.mode == 'train':  # Training stops at a step boundary itself (StopWatcher).
        modes[FLAGS.mode](FLAGS.config, FLAGS.workdir)
      else:
        with stopping.StopOnSignal(FLAGS.mode, on_stop=_exit_stopped):
          logging.info('--mode=%s: Ctrl-C or SIGTERM stops it (exit 130 / 75, %s).', FLAGS.mode,
                       'finished shards are kept: the same command resumes' if FLAGS.mode == 'pack'
                       else 'nothing written: results are written when it completes')
          modes[FLAGS.mode](FLAGS.config, FLAGS.workdir)
    except stopping.Interrupted as e:
      logging.warning('%s To resume, run the same command:\n  %s', e, resume_command())
      sys.stdout.flush()
      sys.stderr.flush()
      sys.exit(e.exit_code)


def _exit_stopped(stopped: stopping.Interrupted):
  """Ends an evaluation stopped by a signal: one warning, training's exit code (75 / 130).

  os._exit, from the signal handler: its results are written only at the end,
  atomically, so nothing is half-written, and no library code gets the chance
  to catch the stop (or to wait on its threads).
  """
  print(f'{stopped} To rerun it, run the same command:\n  {resume_command()}', file=sys.stderr,
        flush=True)
  sys.stdout.flush()
  os._exit(stopped.exit_code)  # pylint: disable=protected-access


# --------------------------------------------------------------------------
# Errors a user can cause end in one message and a non-zero exit (no traceback
# unless --verbose).


def _verbose(argv=None) -> bool:
  argv = sys.argv if argv is None else argv
  return any(a in ('--verbose', '--verbose=true', '--verbose=True') for a in argv)


def fail(kind: str, message: str, argv=None):
  """Prints 'Error (<kind>): <message>' (+ the traceback with --verbose) and exits."""
  if _verbose(argv):
    traceback.print_exc()
  errors.exit_with_message(kind, message)


class one_message_on_user_errors:  # pylint: disable=invalid-name
  """Turns the project's UserError types into one message (their own `kind`); anything else is a bug."""

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is not None and issubclass(exc_type, errors.UserError):
      fail(exc_type.kind, f'{exc} (rerun with --verbose for the traceback)')
    return False


def parse_flags(argv):
  """absl's flag parsing, but a bad flag, override or config file is one line."""
  try:
    argv = with_default_config(argv)
    rest = FLAGS(argv)
    if FLAGS.config is not None:
      FLAGS.config.get('seed')  # Loads the config file now: a missing one fails here.
    return rest
  except Exception as e:  # pylint: disable=broad-except
    user_error = _user_error_in(e)
    if user_error is not None:  # E.g. a broken WORKDIR/config.json: its own message.
      # config_flags re-raises it with the traceback in its text: keep the message.
      message = re.sub(r'^[\w.]+Error: ', '', first_line(user_error))
      fail(user_error.kind, message, argv)
    fail('flags', flag_error_message(argv, e), argv)


def _user_error_in(error):
  """The project's UserError that caused `error` (config_flags wraps it), or None."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, errors.UserError):
      return error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


def flag_error_message(argv, error) -> str:
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
    why = 'no such file' if not os.path.isfile(file) else first_line(error)
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
  return first_line(error)


def first_line(error) -> str:
  """The telling line of an error: its first, or the last of an embedded traceback."""
  text = str(error).strip()
  if len(text) > 1 and text[0] == text[-1] and text[0] in '"\'':
    text = text[1:-1]
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if any(line.startswith('Traceback') for line in lines):
    lines = lines[-1:]
  return lines[0] if lines else type(error).__name__
