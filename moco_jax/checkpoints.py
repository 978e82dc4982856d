"""Orbax checkpoints of the whole train state in WORKDIR/checkpoints.

Orbax writes each step into a temporary directory and renames it when complete,
so a run killed mid-save leaves the previous checkpoint intact (atomic saves).
"""

import json
import os
import re
import signal
import threading
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from moco_jax import models
from moco_jax import parallel


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


# --------------------------------------------------------------------------
# Describing and checking backbones.


def _flat_shapes(tree) -> dict:
  """{'layer1_0/conv1/kernel': (3, 3, 8, 8), ...} of a nested dict of arrays/metadata."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = '/'.join(str(getattr(p, 'key', p)) for p in path)
    out[key] = tuple(leaf.shape)
  return out


def describe_backbone(param_shapes: dict) -> str:
  """'resnet18 (stem cifar, width 16, 128 features)' from flat backbone param shapes."""
  stem_kernel = param_shapes.get('conv1/kernel')
  if stem_kernel is None:
    return 'an unknown network (no conv1/kernel)'
  stem = {7: 'imagenet', 3: 'cifar'}.get(stem_kernel[0], f'{stem_kernel[0]}x{stem_kernel[0]}')
  blocks = {}
  for key in param_shapes:
    match = re.match(r'layer(\d+)_(\d+)/', key)
    if match:
      stage, block = int(match.group(1)), int(match.group(2))
      blocks[stage] = max(blocks.get(stage, 0), block + 1)
  stage_sizes = tuple(blocks[s] for s in sorted(blocks))
  bottleneck = 'layer1_0/conv3/kernel' in param_shapes
  name = 'custom resnet'
  for arch, (sizes, block_cls) in models._ARCHS.items():  # pylint: disable=protected-access
    if tuple(sizes) == stage_sizes and (block_cls is models.Bottleneck) == bottleneck:
      name = arch
  last = f'layer{len(stage_sizes)}_{stage_sizes[-1] - 1}/' if stage_sizes else ''
  out_kernel = param_shapes.get(last + ('conv3/kernel' if bottleneck else 'conv2/kernel'))
  features = out_kernel[-1] if out_kernel else '?'
  return (f'{name} (stages {list(stage_sizes)}, stem {stem}, width {stem_kernel[-1]}, '
          f'{features} features)')


def expected_backbone_shapes(model_config) -> dict:
  """Flat param shapes of the backbone `model_config` describes (no compute)."""
  backbone = models.create_backbone(model_config)
  dummy = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: backbone.init(jax.random.PRNGKey(0), x, train=False),
                             dummy)
  return _flat_shapes(variables['params'])


def check_backbone_matches(found: dict, model_config, where: str, workdir: str):
  """Raises ValueError naming both architectures if `found` is not `model_config`'s backbone."""
  expected = expected_backbone_shapes(model_config)
  if found == expected:
    return
  diffs = []
  for key in sorted(set(found) | set(expected)):
    if found.get(key) != expected.get(key):
      diffs.append(f'{key}: checkpoint {found.get(key, "missing")}, config '
                   f'{expected.get(key, "missing")}')
  hint = _pretraining_model_hint(workdir)
  raise ValueError(
      f'{where} holds a {describe_backbone(found)} backbone, but the config asks for '
      f'{describe_backbone(expected)} (config.model.name={model_config.name!r}, '
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
    raise FileNotFoundError(
        f'No checkpoint to evaluate in {directory} (found: {listing}). Expected step '
        f'directories written by `python main.py --mode=train --workdir={workdir}`; pass the '
        'workdir of a pretraining run, or measure the random-init floor with '
        '--config.eval.random_init=True.')
  return int(step)


def restore_query_encoder(workdir: str, model_config, step: Optional[int] = None):
  """(params, batch_stats, step) of the query encoder in a checkpoint of `workdir`.

  The checkpoint's shapes are read from its metadata first, so a wrong
  architecture fails in a second with both descriptions, not deep in Orbax.
  """
  step = latest_checkpoint_step(workdir) if step is None else step
  directory = checkpoint_dir(workdir)
  manager = ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler())
  try:
    metadata = manager.item_metadata(step)
    where = f'The checkpoint at step {step} in {directory}'
    if metadata is None or 'query_params' not in metadata:
      raise ValueError(f'{where} is not a MoCo train state (no query_params).')
    found = _flat_shapes(metadata['query_params'].get('backbone', {}))
    check_backbone_matches(found, model_config, where, workdir)
    # Onto this process's first device, whatever mesh wrote it: without a
    # target Orbax would rebuild the writer's sharding and fail on another
    # topology (a checkpoint of 2 processes read by 1, or the other way).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          metadata)
    restored = manager.restore(step, args=ocp.args.StandardRestore(target))
  finally:
    manager.close()
  return restored['query_params'], restored['query_batch_stats'], int(step)


class PreemptionWatcher:
  """Turns SIGTERM (what schedulers and preemptible VMs send) into a clean stop.

  The loop asks `requested(manager, step)` after EVERY step; the run then saves
  that step and returns, and the same command resumes from it.

  One process: a Python SIGTERM handler sets a flag.

  Several processes: every process must stop after the same step, even when
  the signal reaches them at different steps (or only one of them). After
  `jax.distributed.initialize`, JAX's preemption sync manager owns SIGTERM (a
  C++ handler that tells the coordination service); Orbax's
  `reached_preemption(step)` then returns True on every process at the same
  step, the first one after the notice that all of them reach. That is why
  no Python handler is installed then: it would replace the runtime's and the
  notice would never arrive (the run would go on until SIGKILL). The sync
  point is one exact step, so `requested` must be asked at every step.
  If the preemption service is disabled (jax_enable_preemption_service=False),
  a Python handler sets a flag and the processes agree on it with a tiny
  all-gather after every step (which waits for the step: slower).
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = None
    self._runtime_sync = jax.process_count() > 1 and _preemption_service_running()
    if not self._runtime_sync and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())

  def requested(self, manager: ocp.CheckpointManager, step: int) -> bool:
    if self._runtime_sync:
      return manager.reached_preemption(step)
    if jax.process_count() > 1:
      return bool(np.max(parallel.host_gather(np.int32(self._event.is_set()))))
    return self._event.is_set()

  def uninstall(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def _preemption_service_running() -> bool:
  """True when jax.distributed runs its preemption sync manager (the default)."""
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return getattr(jax_distributed.global_state, 'preemption_sync_manager', None) is not None
