"""Orbax checkpoints of the whole train state in WORKDIR/checkpoints.

Orbax writes each step into a temporary directory and renames it when complete,
so a run killed mid-save leaves the previous checkpoint intact (atomic saves).
"""

import json
import os
import re
from typing import Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from moco_jax import models


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
    restored = manager.restore(step, args=ocp.args.StandardRestore())
  finally:
    manager.close()
  return restored['query_params'], restored['query_batch_stats'], int(step)
