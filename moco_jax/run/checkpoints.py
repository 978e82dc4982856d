"""Orbax checkpoints of the whole train state in WORKDIR/checkpoints.

Orbax writes each step into a temporary directory and renames it when complete,
so a run killed mid-save leaves the previous checkpoint intact (atomic saves).
"""

import asyncio
import functools
import json
import os
import shutil
import sys
import threading
import warnings
from typing import Optional

import jax
import orbax.checkpoint as ocp

from absl import logging

from moco_jax.core import errors
from moco_jax.models import describe


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints, absolute (Orbax wants absolute paths)."""
  return os.path.abspath(os.path.join(workdir, 'checkpoints'))


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the step directories in WORKDIR/checkpoints (no Orbax, no checks)."""
  directory = checkpoint_dir(workdir)
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(n) for n in names if n.isdigit())


def create_manager(workdir: str, config) -> ocp.CheckpointManager:
  """A manager keeping `config.keep_checkpoints` steps in WORKDIR/checkpoints.

  Step directories are created synchronously: created in Orbax's background
  thread, a failure (an unwritable directory) left the commit waiting 300 s for
  a signal that never came; here it fails in `save` at once.
  """
  if config.keep_checkpoints < 1:  # max_to_keep=0 would keep nothing.
    raise errors.ConfigError(f'config.keep_checkpoints={config.keep_checkpoints} must be >= 1.')
  # A failed save (disk full, file-size limit) leaves the same late callbacks as
  # a failed restore: hundreds of 'Event loop is closed' tracebacks otherwise.
  _quiet_closed_event_loop_errors()
  _save_replicated_arrays_whole()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints, create=True, cleanup_tmp_directories=True,
      async_options=ocp.options.AsyncOptions(create_directories_asynchronously=False))
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


@functools.cache  # Once per process: Orbax warns at each registration.
def _save_replicated_arrays_whole():
  """Each replicated array is written whole by its first replica when there is one process.

  Orbax's default on CPU and TPU ("replica-parallel") splits every replicated
  array into one slice per device and writes each slice from its own device, so
  that the hosts of a pod share the writing. Each slice is a compiled
  `slice_in_dim`, one per leaf and device, compiled at the first save of a run
  (docs/benchmarks.md, "Checkpoints"). With one process every slice is written
  by the same host anyway, so nothing is shared: saving whole costs nothing and
  compiles nothing. Jobs of several processes keep Orbax's default.
  """
  if jax.process_count() == 1:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


def save(manager: ocp.CheckpointManager, step: int, state):
  """Saves `state` at `step` (asynchronously; the loop goes on)."""
  manager.save(step, args=ocp.args.StandardSave(state))


def restore_latest(manager: ocp.CheckpointManager, target):
  """The newest checkpoint that restores, in the structure and shardings of `target`.

  Returns `target` unchanged when there is no checkpoint yet. Checkpoints newer
  than the one restored that do not restore (truncated, corrupt) are then moved
  aside to WORKDIR/checkpoints_corrupt/ with a warning each, never deleted (the
  run will save those steps again). When none restores nothing is moved: the
  CheckpointError changes nothing on disk. A checkpoint of another model is a
  CheckpointError.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  failed = []
  for step in steps:
    try:
      _check_state_shapes(manager, step, target)
      restored = restore(manager, step, target)
    except errors.CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      _quiet_closed_event_loop_errors()
      failed.append((step, e))
      continue
    for bad, e in failed:
      moved = move_aside(manager, bad)
      logging.warning('The checkpoint at step %d in %s does not restore (%s: %s); moved it to '
                      '%s (nothing deleted) and restored step %d.', bad, manager.directory,
                      type(e).__name__, _short(e), moved, step)
    return restored
  if steps:
    manager.reload()
    step, e = failed[0]
    raise errors.CheckpointError(
        f'No checkpoint in {manager.directory} restores (tried steps {steps}; step {step}: '
        f'{type(e).__name__}: {_short(e, 120)}). Nothing was changed: move that directory away '
        'to start from scratch, or pass another --workdir.')
  return target


def _quiet_closed_event_loop_errors():
  """Silences the 'Event loop is closed' tracebacks a failed restore or save leaves behind.

  After a restore or save fails, TensorStore operations still in flight complete and post
  to Orbax's already closed asyncio loop, from other threads; the resulting
  RuntimeError tracebacks are printed after the clear message and mean nothing.
  """
  def quiet(previous):
    def hook(*args):
      exc = args[1] if len(args) == 3 else getattr(args[0], 'exc_value', None)
      if (isinstance(exc, RuntimeError) and 'Event loop is closed' in str(exc)
          or _is_orphaned_read(args[0] if len(args) == 1 else None)):
        logging.debug('Ignored a late callback of a failed restore: %s', _short(exc))
        return
      previous(*args)
    hook.quiet = True
    return hook

  _quiet_orphaned_reads()
  if not getattr(sys.excepthook, 'quiet', False):
    sys.excepthook = quiet(sys.excepthook)
  if not getattr(threading.excepthook, 'quiet', False):
    threading.excepthook = quiet(threading.excepthook)
  if not getattr(sys.unraisablehook, 'quiet', False):
    sys.unraisablehook = quiet(sys.unraisablehook)


def _is_orphaned_read(unraisable) -> bool:
  """Whether an unraisable exception is a chunk read of a failed restore, freed unfinished.

  When the garbage collector closes such a read's coroutine (Orbax's
  `_read_array_index_and_device_put`), its error surfaces through
  sys.unraisablehook as "Exception ignored in: <coroutine ...>" with the
  TensorStore spec: ~60 lines per chunk, hundreds of chunks, by chance
  (`tools/corrupt_reruns.py` saw 9 of 12 reruns of main.py print thousands).
  """
  if unraisable is None:
    return False
  name = getattr(getattr(unraisable, 'object', None), '__qualname__', '')
  return '_read_array_index' in name or 'reading array index' in str(
      getattr(unraisable, 'exc_value', ''))


# What asyncio says when an orphaned task's exception is garbage-collected unread.
_ORPHANED = ('exception was never retrieved', 'was destroyed but it is pending')


def _orphaned_read_handler(loop, context):
  """An event loop's exception handler: drops the errors of reads a failed restore left behind.

  Orbax restores a checkpoint as one asyncio task per array chunk on a fresh
  event loop (`orbax...asyncio_utils.run_sync`). When one chunk is corrupt, the
  first error ends the restore (and is reported once, by `restore_latest`); the
  sibling tasks that fail too are never awaited, and when the garbage collector
  frees them asyncio's default handler logs each one with its traceback, from
  whichever thread, at whatever time: a few lines or thousands, by chance
  (issue 32). Their exceptions are the same failure, already reported; they
  are logged here at debug level only. Anything else goes to the default handler.
  """
  if any(text in context.get('message', '') for text in _ORPHANED):
    logging.debug('Dropped an orphaned read of a failed restore: %s', context.get('exception'))
    return
  loop.default_exception_handler(context)


class _QuietLoopPolicy(asyncio.DefaultEventLoopPolicy):
  """Every new event loop (Orbax makes one per restore) gets `_orphaned_read_handler`."""

  def new_event_loop(self):
    loop = super().new_event_loop()
    loop.set_exception_handler(_orphaned_read_handler)
    return loop


def _quiet_orphaned_reads():
  """Installs `_QuietLoopPolicy` (once; a policy set by someone else is left alone)."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)  # Policies: deprecated in 3.14.
    policy = asyncio.get_event_loop_policy()
    if type(policy) is asyncio.DefaultEventLoopPolicy:  # pylint: disable=unidiomatic-typecheck
      asyncio.set_event_loop_policy(_QuietLoopPolicy())


def restore(manager: ocp.CheckpointManager, step: int, target):
  """Checkpoint `step` restored like `target`."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def _short(error, limit: int = 200) -> str:
  text = ' '.join(str(error).split())
  return text if len(text) <= limit else text[:limit] + '...'


def _shapes(tree) -> list:
  return sorted(tuple(leaf.shape) for leaf in jax.tree.leaves(tree) if hasattr(leaf, 'shape'))


def _key_name(key) -> str:
  for field in ('key', 'name', 'idx'):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey.
    if hasattr(key, field):
      return str(getattr(key, field))
  return str(key)


def _named_shapes(tree) -> dict:
  """'method_state/bank' -> shape, for every array of a train state or its metadata."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(_key_name(k) for k in path): tuple(leaf.shape)
          for path, leaf in flat if hasattr(leaf, 'shape')}


def _shape_changes(found, wanted, limit: int = 3) -> str:
  """The first `limit` arrays whose shape differs between two train states, as text."""
  found, wanted = _named_shapes(found), _named_shapes(wanted)
  changed = [f'{name} {list(found[name])} in the checkpoint, {list(shape)} now'
             for name, shape in wanted.items() if name in found and found[name] != shape]
  return '; '.join(changed[:limit]) + (' ...' if len(changed) > limit else '')


def _check_state_shapes(manager: ocp.CheckpointManager, step: int, target):
  """CheckpointError if checkpoint `step` holds another model's state (read from metadata)."""
  metadata = manager.item_metadata(step)
  if metadata is None:  # Nothing to compare before restoring: restore decides.
    return
  found = _shapes(metadata)
  if found == _shapes(target):
    return
  params = metadata.get('params') if hasattr(metadata, 'get') else None
  backbone = describe.flat_shapes(params.get('backbone', {})) if params is not None else {}
  described = describe.describe_backbone(backbone) if backbone else 'an unknown backbone'
  wanted = describe.describe_backbone(describe.flat_shapes(target.params.get('backbone', {})))
  changes = _shape_changes(metadata, target) if described == wanted else ''
  if changes:
    # Same model: the method's state differs, e.g. a memory bank's rows (one per training
    # image) after the train split changed size.
    raise errors.CheckpointError(
        f'The checkpoint at step {step} in {manager.directory} holds the same model but '
        f'method state of other sizes ({changes}): the method\'s sizes (e.g. moco.queue_size) '
        'or, for method=memory_bank (one bank row per training image), the train split\'s size '
        'changed. Rerun with the config and data that wrote it, or pass a new --workdir.')
  raise errors.CheckpointError(
      f'The checkpoint at step {step} in {manager.directory} holds another train state '
      f'({described}, {len(found)} arrays; this config builds {wanted}, '
      f'{len(_shapes(target))} arrays): the method, model, embed_dim or the method\'s sizes '
      '(e.g. moco.queue_size) differ. Rerun with the config that wrote it, or pass a new '
      '--workdir.')


def move_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves step directory `step` to WORKDIR/checkpoints_corrupt/<step>[.n]; returns where."""
  source = os.path.join(str(manager.directory), str(step))
  target_dir = os.path.join(os.path.dirname(str(manager.directory)), 'checkpoints_corrupt')
  target = os.path.join(target_dir, str(step))
  n = 1
  while os.path.exists(target):
    target, n = os.path.join(target_dir, f'{step}.{n}'), n + 1
  if jax.process_index() == 0:
    os.makedirs(target_dir, exist_ok=True)
    shutil.move(source, target)
  manager.reload()
  return target


# --------------------------------------------------------------------------
# Checking backbones.


def check_backbone_matches(found: dict, model_config, where: str, workdir: str,
                           channels: int = 3):
  """Raises ValueError naming both architectures if `found` is not `model_config`'s backbone."""
  expected = describe.expected_backbone_shapes(model_config, channels)
  if found == expected:
    return
  diffs = []
  for key in sorted(set(found) | set(expected)):
    if found.get(key) != expected.get(key):
      diffs.append(f'{key}: checkpoint {found.get(key, "missing")}, config '
                   f'{expected.get(key, "missing")}')
  hint = _pretraining_model_hint(workdir)
  raise errors.CheckpointError(
      f'{where} holds a {describe.describe_backbone(found)} backbone, but the config asks for '
      f'{describe.describe_backbone(expected)} (config.model.name={model_config.name!r}, '
      f'stem={model_config.stem!r}, width={model_config.width}). First differences: '
      f'{"; ".join(diffs[:3])}. Evaluate with the model of the pretraining run{hint}.')


def _pretraining_model_hint(workdir: str) -> str:
  """' (WORKDIR/config.json: --config.model.name=... ...)' when the run's config is there."""
  path = os.path.join(workdir, 'config.json')
  try:
    with open(path) as f:
      model = json.load(f)['model']
    flags = ' '.join(f'--config.model.{k}={model[k]}' for k in ('name', 'stem', 'width')
                     if k in model)
    return f' ({path}: {flags})'
  except (OSError, ValueError, KeyError, TypeError):
    return ''


# --------------------------------------------------------------------------
# Restoring.


def latest_checkpoint_step(workdir: str) -> int:
  """The newest complete checkpoint step in WORKDIR/checkpoints, or a clear error."""
  directory = checkpoint_dir(workdir)
  found = sorted(os.listdir(directory)) if os.path.isdir(directory) else None
  step = None
  if found:
    manager = ocp.CheckpointManager(directory)
    step = manager.latest_step()
    manager.close()
  if step is None:
    listing = 'no such directory' if found is None else (', '.join(found[:10]) or 'an empty directory')
    raise errors.CheckpointNotFoundError(
        f'No checkpoint to evaluate in {directory} (found: {listing}). Expected step '
        f'directories written by `python main.py --mode=train --workdir={workdir}`; pass the '
        'workdir of a pretraining run, or measure the random-init floor with '
        '--config.eval.random_init=True.')
  return int(step)


def restore_query_encoder(workdir: str, model_config, step: Optional[int] = None,
                          channels: int = 3):
  """(params, batch_stats, step) of the query encoder in a checkpoint of `workdir`.

  The checkpoint's shapes are read from its metadata first, so a wrong
  architecture fails in a second with both descriptions, not deep in Orbax.
  """
  steps = [latest_checkpoint_step(workdir)] if step is None else [step]
  directory = checkpoint_dir(workdir)
  manager = ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler())
  if step is None:  # The newest that restores: a corrupt latest falls back, with a warning.
    steps = sorted(manager.all_steps(), reverse=True)
  try:
    for i, step in enumerate(steps):
      where = f'The checkpoint at step {step} in {directory}'
      try:
        metadata = manager.item_metadata(step)
        params = metadata.get('params') if metadata is not None else None
        if params is None:
          raise errors.CheckpointError(f'{where} is not a train state of this code (no params).')
        found = describe.flat_shapes(params.get('backbone', {}))
        check_backbone_matches(found, model_config, where, workdir, channels)
        # Onto this process's first device: the checkpoint may come from another topology
        # (pretrained on 8 GPUs, evaluated on 1).
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
        restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
        return restored['params'], restored['batch_stats'], int(step)
      except errors.CheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        if i + 1 == len(steps):
          raise errors.CheckpointError(
              f'{where} does not restore ({type(e).__name__}: {_short(e)}), nor does any older '
              f'one (tried {steps}): rerun the pretraining, or pass the workdir of another '
              'run.') from e
        logging.warning('%s does not restore (%s: %s); evaluating the previous one instead.',
                        where, type(e).__name__, _short(e))
  finally:
    manager.close()
