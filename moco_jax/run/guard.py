"""Run safety: nothing non-finite is saved, no save fails silently, no resume changes meaning.

Small functions the training loop calls at fixed points (so the loop itself
stays short):

  * `check_writable` and `check_resume_config` before any work: an unwritable
    workdir, or a workdir whose checkpoints came from a config that gives them
    another meaning (model, queue, batch, seed, data), fail at once, naming it.
  * `Guard.check_finite` at each log and `Guard.save` at each save: one fused
    max-|x| reduction over the whole state on the device; a non-finite (or
    exploded, > MAX_ABS) state is never written, and the run stops naming the
    last good checkpoint.
  * `Guard.poll` after each step: a failed asynchronous save surfaces at once as
    a CheckpointError, not at the next save (or never).
"""

import json
import math
import os
import re
from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp

from moco_jax.core import errors
from moco_jax.core import files
from moco_jax.methods import registry
from moco_jax.run import checkpoints
from moco_jax.run import run_config

# Fields whose change makes an existing checkpoint (or the data order after it)
# mean something else; the method adds its own (`registry.resume_fields`).
# Optimiser, augmentation, logging and evaluation fields may change on resume
# (e.g. extending a run with more steps).
RESUME_FIELDS = (
    'seed', 'batch_size', 'model.name', 'model.stem', 'model.width', 'model.head',
    'model.head_hidden_dim', 'model.head_dims', 'model.embed_dim', 'optim.name',
    'data.image_size', 'data.cache_size', 'data.train_split', 'data source',
)
_DATA_FIELDS = {  # The fields that name the training data, per source.
    'folder': ('data.path', 'data.labels', 'data.val_fraction'),
    'tfds': ('data.name', 'data.data_dir'),
    'synthetic': ('data.synthetic_examples', 'data.synthetic_classes'),
}


def check_writable(workdir: str):
  """Creates WORKDIR and WORKDIR/checkpoints and writes a probe file in each."""
  for directory in (os.path.abspath(workdir), checkpoints.checkpoint_dir(workdir)):
    probe = os.path.join(directory, f'.write_test.{os.getpid()}')
    try:
      os.makedirs(directory, exist_ok=True)
      with open(probe, 'w') as f:
        f.write('ok')
      os.remove(probe)
    except OSError as e:
      why = 'it is a file' if os.path.isfile(directory) else e.strerror or str(e)
      raise errors.CheckpointError(
          f'{directory} is not a writable directory ({why}): checkpoints and '
          'metrics go there. Fix its permissions or free space, or pass another --workdir.'
      ) from e


def resume_fields(config) -> tuple:
  """The fields a resume of `config` must keep: the run's, the method's and its data source's."""
  source = 'folder' if config.data.get('path') else config.data.get('source')
  return RESUME_FIELDS + registry.resume_fields(config) + _DATA_FIELDS.get(source, ())


def check_resume_config(workdir: str, config):
  """Refuses to resume from checkpoints of a config that gives them another meaning.

  Compares `config` with WORKDIR/config.json (the config of the run that wrote
  the checkpoints) when checkpoints exist; lists every difference. With
  `config.allow_config_change=True` the run resumes anyway, with a warning.
  """
  steps = checkpoints.checkpoint_steps(workdir)
  path = run_config.config_path(workdir)
  if not steps or not os.path.exists(path):
    return
  try:
    previous = run_config.read_run_config(workdir)
  except errors.ConfigError as e:
    logging.warning('%s Resuming without checking that the config matches.', e)
    return
  diffs = [f'{k}: {a!r} -> {b!r}'
           for k, (a, b) in run_config.compare(previous, config, resume_fields(config)).items()]
  if not diffs:
    return
  where = f'{checkpoints.checkpoint_dir(workdir)} (steps up to {max(steps)}, config in {path})'
  if config.get('allow_config_change', False):
    logging.warning('Resuming from %s with a changed config, as allowed by '
                    'config.allow_config_change: %s.', where, '; '.join(diffs))
    return
  raise errors.CheckpointError(
      f'Refusing to resume from {where}: this config changes what the checkpoint or the data '
      f'order means ({"; ".join(diffs)}). Use a new --workdir, restore the old values, or pass '
      '--config.allow_config_change=True to resume anyway.')


FILE_LIST = 'stream_file_list.json'


def check_file_list(workdir: str, file_list: dict, start_step: int, config):
  """A streamed resume must read the file list the run started with.

  The data order of step s is a permutation of the indexed list, so files
  added to or removed from a streamed folder between a run and its resume
  would silently continue on another order (issue 18). WORKDIR/stream_file_list.json
  records the list's fingerprint (`streaming.file_list_fingerprint`) when the
  run starts; a resume with another list is refused naming the change, or,
  with `config.allow_config_change=True`, continues on the new list with a
  warning (and records it).
  """
  path = os.path.join(workdir, FILE_LIST)
  try:
    with open(path) as f:
      previous = json.load(f)
  except FileNotFoundError:
    previous = None
  except (OSError, ValueError) as e:
    logging.warning('Cannot read %s (%s): resuming without checking the streamed file list.',
                    path, e)
    previous = None
  same = previous is not None and all(previous.get(k) == file_list[k] for k in ('count', 'sha256'))
  if start_step and previous is not None and not same:
    count_then, count_now = previous.get('count'), file_list.get('count')
    change = (f'{count_then} files when the run started, {count_now} now' if count_then != count_now
              else f'the same count ({count_now}) but other files or labels')
    where = file_list.get('where', 'the train split')
    if not config.get('allow_config_change', False):
      raise errors.CheckpointError(
          f'Refusing to resume from step {start_step}: the streamed file list of {where} changed '
          f'({change}; recorded in {path}), so the run would continue on another data order. '
          'Restore the folder, use a new --workdir, or pass --config.allow_config_change=True '
          'to resume on the new list.')
    logging.warning('Resuming from step %d on a changed file list of %s (%s), as allowed by '
                    'config.allow_config_change: the data order from here on differs.',
                    start_step, where, change)
  if not same and jax.process_index() == 0:
    try:
      files.atomic_write(path, lambda f: json.dump(file_list, f))
    except OSError as e:
      raise errors.CheckpointError(f'Cannot write {path} ({e}): make --workdir writable.') from e


def check_resume_step(start_step: int, total_steps: int, config, directory: str):
  """A checkpoint beyond the configured length is a mistake, not a finished run."""
  if start_step > total_steps:
    raise errors.ConfigError(
        f'The checkpoint in {directory} is at step {start_step}, beyond the {total_steps} steps '
        f'this config trains (config.num_train_steps={config.num_train_steps}, '
        f'num_epochs={config.num_epochs}): raise --config.num_train_steps (or num_epochs) above '
        f'{start_step}, or pass a new --workdir.')


# A state holding a value this large has exploded even if it is still finite: with
# --config.optim.base_lr=1e9 the parameters reach 1e11 and the BatchNorm statistics 1e27
# a step before they overflow, and a rerun resumed from there overflows at once. A
# healthy run's values (parameters, statistics, momenta, normalised queue keys) stay
# within a few hundred.
MAX_ABS = 1e8


@jax.jit
def _max_abs(tree) -> jax.Array:
  """One fused reduction: the largest |x| over the floating-point leaves (NaN if any is)."""
  leaves = [jnp.max(jnp.abs(x)).astype(jnp.float32) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact) and x.size]
  return jnp.max(jnp.stack(leaves)) if leaves else jnp.float32(0)


def max_abs(tree) -> float:
  return float(jax.device_get(_max_abs(tree)))


def all_finite(tree) -> bool:
  return math.isfinite(max_abs(tree))


class Guard:
  """Saves only finite states, surfaces failed async saves, names the last good step."""

  def __init__(self, manager, config):
    self.manager = manager
    self.config = config
    self._pending: Optional[int] = None  # Step of the last save handed to Orbax.

  def poll(self, step: int):
    """Raises CheckpointError now if an asynchronous save failed in the background."""
    if self._pending is None:
      return
    try:
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self._save_failed(self._pending, e, step)

  def check_finite(self, step: int, state, loss: Optional[float] = None):
    """Stops the run (NonFiniteError) if the loss or any value of the state is NaN/Inf."""
    if loss is not None and not math.isfinite(loss):
      self._diverged(step, f'train_loss is {loss}')
    largest = max_abs(state)
    if not math.isfinite(largest):
      self._diverged(step, 'the train state holds NaN/Inf values')
    if largest > MAX_ABS:
      self._diverged(step, f'the train state holds values of magnitude {largest:.3g} (over '
                     f'{MAX_ABS:.0e}: exploding)')

  def save(self, step: int, state):
    """Saves `state` at `step` (asynchronously) if it is finite; else stops the run."""
    self.check_finite(step, state)
    self.poll(step)
    if self._pending is not None:
      # Orbax's save() first waits for the previous one and raises its error:
      # wait here, so that a failure names the step whose save failed (the
      # previous save has almost always finished long before).
      try:
        self.manager.wait_until_finished()
        self.manager.check_for_errors()
      except Exception as e:  # pylint: disable=broad-except
        self._save_failed(self._pending, e, step)
    try:
      checkpoints.save(self.manager, step, state)
    except Exception as e:  # pylint: disable=broad-except
      self._save_failed(step, e, step)
    self._pending = step

  def finish(self):
    """Waits for the last save; a failure is a CheckpointError naming it."""
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self._save_failed(self._pending, e, None)

  def _last_good(self) -> str:
    try:
      self.manager.wait_until_finished()
      self.manager.reload()
      last = self.manager.latest_step()
    except Exception:  # pylint: disable=broad-except
      last = None
    if last is None:
      return 'No checkpoint was saved yet: a rerun starts from scratch'
    return (f'The last checkpoint, step {last} in {self.manager.directory}, is kept and a rerun '
            'resumes from it')

  def _save_failed(self, step, error, now):
    at = f' (noticed at step {now})' if now is not None and now != step else ''
    raise errors.CheckpointError(
        f'Saving the checkpoint of step {step} to {self.manager.directory} failed{at}: '
        f'{save_failure_reason(error)}. {self._last_good()}; make the directory writable '
        '(permissions, free space, file-size limit: ulimit -f) and rerun the same command.'
    ) from error

  def _diverged(self, step: int, what: str):
    raise errors.NonFiniteError(
        f'{what} at step {step}: training diverged, and no such state was saved. '
        f'{self._last_good()}; lower --config.optim.base_lr (now {self.config.optim.base_lr}) '
        'or check the data before rerunning.')


_OS_ERROR = re.compile(r"([A-Za-z][^:\[\]\"]*?) \[os_error_code='?(\d+)'?\]")


def save_failure_reason(error) -> str:
  """The OS reason of a failed save first ('File too large (errno 27)'), then Orbax's text.

  TensorStore's message starts with long temporary paths and ends with the
  reason; cut at a fixed length, the reason was lost.
  """
  text = ' '.join(str(error).split())
  if isinstance(error, OSError) and error.strerror:
    reason = f'{error.strerror} (errno {error.errno})'
  else:
    match = _OS_ERROR.search(text)
    reason = f'{match.group(1).strip()} (errno {match.group(2)})' if match else ''
  detail = text[:200] + ('...' if len(text) > 200 else '')
  return f'{reason}; {type(error).__name__}: {detail}' if reason else (
      f'{type(error).__name__}: {detail}' if text else type(error).__name__)
