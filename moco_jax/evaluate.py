"""Evaluation entry points: a frozen backbone from a workdir, kNN, results file.

`load_backbone` restores the QUERY encoder's backbone (params + BatchNorm
running statistics) from the latest Orbax checkpoint of WORKDIR/checkpoints,
after checking that its shapes are those of `config.model`, or builds the
randomly initialised encoder the pretraining started from
(`config.eval.random_init`), the floor every result is compared with.

Results go to WORKDIR/eval.json, merged with what is there, so kNN, linear and
random-init rows written by separate runs live side by side:

  knn_top1, knn_step                        kNN on the latest checkpoint
  linear_top1, linear_top5, linear_step     linear probe on it
  random_init_knn_top1, random_init_...     the same on the step-0 encoder

Accuracies are percentages (0-100); *_step is the checkpoint's train step
(0 for random init).
"""

import json
import os
import re
from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from moco_jax import checkpoints
from moco_jax import knn
from moco_jax import metrics_writer
from moco_jax import models
from moco_jax import state as state_lib
from moco_jax import train

RESULTS_FILE = 'eval.json'


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
  directory = checkpoints.checkpoint_dir(workdir)
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
  directory = checkpoints.checkpoint_dir(workdir)
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


def random_init_encoder(config):
  """(params, batch_stats) of the step-0 query encoder: the untrained floor.

  `state.initial_encoder_variables`, which `state.create_train_state` uses
  too: exactly the weights pretraining starts from with this config.seed.
  """
  encoder = models.create_encoder(config.model)
  return state_lib.initial_encoder_variables(jax.random.PRNGKey(config.seed), encoder,
                                             config.data.image_size)


def load_backbone(config, workdir: str):
  """(backbone module, backbone variables, step, results key prefix) to evaluate.

  With config.eval.random_init the step-0 encoder (step 0, prefix
  'random_init_'); otherwise the latest checkpoint's query encoder (prefix '').
  """
  backbone = models.create_backbone(config.model)
  if config.eval.random_init:
    params, batch_stats = random_init_encoder(config)
    step, prefix = 0, 'random_init_'
  else:
    params, batch_stats, step = restore_query_encoder(workdir, config.model)
    prefix = ''
  variables = knn.backbone_variables(params, batch_stats)
  return backbone, jax.device_get(variables), step, prefix


# --------------------------------------------------------------------------
# Results.


def write_results(workdir: str, results: dict) -> dict:
  """Merges `results` into WORKDIR/eval.json (atomically, process 0 only); returns all."""
  path = os.path.join(workdir, RESULTS_FILE)
  merged = read_results(workdir)
  merged.update({k: metrics_writer.json_value(v) for k, v in results.items()})
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w') as f:
      json.dump(merged, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
    logging.info('Wrote %s to %s.', sorted(results), path)
  return merged


def read_results(workdir: str) -> dict:
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


# --------------------------------------------------------------------------
# kNN of a workdir (main.py --mode=knn).


def run_knn(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """kNN top-1 of the latest checkpoint (or random init) -> WORKDIR/eval.json.

  Returns:
    {'<prefix>knn_top1': percent, '<prefix>knn_step': step}.
  """
  backbone, variables, step, prefix = load_backbone(config, workdir)
  del backbone  # The evaluator builds the same one from config.model.
  evaluator = knn.KnnEvaluator(config, train.make_mesh())
  top1 = evaluator(variables)
  results = {f'{prefix}knn_top1': top1, f'{prefix}knn_step': step}
  write_results(workdir, results)
  return results
