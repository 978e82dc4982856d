"""Orbax checkpoints of the whole train state in WORKDIR/checkpoints.

Orbax writes each step into a temporary directory and renames it when complete,
so a run killed mid-save leaves the previous checkpoint intact (atomic saves).
"""

import os
import signal
import threading

import jax
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints, absolute (Orbax wants absolute paths)."""
  return os.path.abspath(os.path.join(workdir, 'checkpoints'))


def create_manager(workdir: str, config) -> ocp.CheckpointManager:
  """A manager keeping `config.keep_checkpoints` steps in WORKDIR/checkpoints."""
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir),
                               options=options)


def save(manager: ocp.CheckpointManager, step: int, state):
  """Saves `state` at `step` (asynchronously; the loop goes on)."""
  manager.save(step, args=ocp.args.StandardSave(state))


def restore_latest(manager: ocp.CheckpointManager, target):
  """The latest checkpoint restored into the structure and shardings of `target`.

  Returns `target` unchanged when there is no checkpoint yet.
  """
  step = manager.latest_step()
  if step is None:
    return target
  return restore(manager, step, target)


def restore(manager: ocp.CheckpointManager, step: int, target):
  """Checkpoint `step` restored like `target`; a clear error if the trees differ."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
        f'The checkpoint at step {step} in {manager.directory} does not match the model of '
        f'this config (architecture, head, embed_dim or queue_size differ?): {e}') from e


class PreemptionWatcher:
  """Turns SIGTERM (what schedulers and preemptible VMs send) into a clean stop.

  The loop asks `requested()` after each step; the run then saves the current
  step and returns, and the same command resumes from it. With several
  processes the decision must be the same on all of them, so Orbax's
  `reached_preemption` (synchronised through jax.distributed) decides.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())

  def requested(self, manager: ocp.CheckpointManager, step: int) -> bool:
    if jax.process_count() > 1:
      return manager.reached_preemption(step)
    return self._event.is_set()

  def uninstall(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
