"""Export of the pretrained backbone with torchvision ResNet parameter names.

The file is a NumPy .npz whose keys are torchvision's `state_dict` keys
(`conv1.weight`, `bn1.running_mean`, `layer1.0.conv1.weight`,
`layer2.0.downsample.0.weight`, `layer2.0.downsample.1.bias`, ...), with
convolution kernels transposed from Flax's HWIO to PyTorch's OIHW. The
projection head is not exported (MoCo evaluates and transfers the backbone), so
load it into torchvision with the classifier removed:

  import numpy as np, torch, torchvision
  model = torchvision.models.resnet18()
  model.fc = torch.nn.Identity()
  # CIFAR stem (config.model.stem='cifar'):
  # model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); model.maxpool = torch.nn.Identity()
  state = {k: torch.from_numpy(v) for k, v in np.load('backbone_torchvision.npz').items()}
  model.load_state_dict(state)

A JSON sidecar (same name, .json) records the model config, so the reader
knows the stem and width. npz needs no extra dependency (safetensors would).
"""

import json
import os
import re

import jax
import numpy as np

from moco_jax.core import files
from moco_jax.evaluation import results
from moco_jax.run import checkpoints

# Flax BatchNorm variable -> torchvision BatchNorm2d buffer/parameter.
_BN_PARAMS = {'scale': 'weight', 'bias': 'bias'}
_BN_STATS = {'mean': 'running_mean', 'var': 'running_var'}


def _torch_module_name(flax_path: tuple) -> str:
  """('layer2_0', 'downsample_conv') -> 'layer2.0.downsample.0'; ('bn1',) -> 'bn1'."""
  parts = []
  for name in flax_path:
    match = re.fullmatch(r'layer(\d+)_(\d+)', name)
    if match:
      parts += [f'layer{match.group(1)}', match.group(2)]
    elif name == 'downsample_conv':
      parts += ['downsample', '0']
    elif name == 'downsample_bn':
      parts += ['downsample', '1']
    else:
      parts.append(name)
  return '.'.join(parts)


def _modules(tree: dict, prefix: tuple = ()):
  """Yields (path, leaf dict) for every innermost module of a nested variable dict."""
  leaves = {k: v for k, v in tree.items() if not isinstance(v, dict)}
  if leaves:
    yield prefix, leaves
  for name, sub in tree.items():
    if isinstance(sub, dict):
      yield from _modules(sub, prefix + (name,))


def torchvision_state_dict(params: dict, batch_stats: dict) -> dict:
  """{torchvision key: np.ndarray} of a Flax backbone's params and batch stats.

  Args:
    params: the backbone's params (the 'backbone' subtree of an encoder).
    batch_stats: the backbone's BatchNorm running statistics.
  """
  params = jax.device_get(params)
  batch_stats = jax.device_get(batch_stats)
  state = {}
  for path, leaves in _modules(params):
    name = _torch_module_name(path)
    if 'kernel' in leaves:  # Convolution, HWIO -> OIHW.
      kernel = np.asarray(leaves['kernel'], np.float32)
      if kernel.ndim != 4:
        raise ValueError(f'{"/".join(path)}/kernel has shape {kernel.shape}: expected a 4-D '
                         'convolution kernel; pass the backbone, not the head.')
      state[f'{name}.weight'] = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
    else:  # BatchNorm affine parameters.
      for flax_name, torch_name in _BN_PARAMS.items():
        state[f'{name}.{torch_name}'] = np.asarray(leaves[flax_name], np.float32)
  for path, leaves in _modules(batch_stats):
    name = _torch_module_name(path)
    for flax_name, torch_name in _BN_STATS.items():
      state[f'{name}.{torch_name}'] = np.asarray(leaves[flax_name], np.float32)
    state[f'{name}.num_batches_tracked'] = np.asarray(0, np.int64)
  return state


def backbone_from_torchvision(state: dict, params: dict, batch_stats: dict):
  """The inverse of `torchvision_state_dict`: Flax backbone trees from torchvision arrays.

  Args:
    state: {torchvision key: array} (a torchvision ResNet state_dict as NumPy).
    params: the backbone's params, used as the template (names and shapes; arrays
      or `jax.eval_shape` structs).
    batch_stats: the backbone's batch stats, also a template.

  Returns:
    (params, batch_stats) shaped like the templates, holding `state`'s values
    (convolution kernels OIHW -> HWIO).
  """
  def fill(tree: dict, prefix: tuple, stats: bool) -> dict:
    out = {}
    for name, leaf in tree.items():
      if isinstance(leaf, dict):
        out[name] = fill(leaf, prefix + (name,), stats)
        continue
      module = _torch_module_name(prefix)
      if stats:
        value = state[f'{module}.{_BN_STATS[name]}']
      elif name == 'kernel':
        value = np.asarray(state[f'{module}.weight']).transpose(2, 3, 1, 0)
      else:
        value = state[f'{module}.{_BN_PARAMS[name]}']
      value = np.asarray(value, np.float32)
      if value.shape != tuple(leaf.shape):
        raise ValueError(f'{module} ({name}): torchvision shape {value.shape} does not match '
                         f'{tuple(leaf.shape)}: another architecture or width.')
      out[name] = value
    return out

  return fill(params, (), False), fill(batch_stats, (), True)


def _backbone_trees(state_or_params, batch_stats):
  """(params, batch_stats) of the backbone from a TrainState or encoder/backbone trees."""
  if hasattr(state_or_params, 'params'):  # A TrainState.
    params, batch_stats = state_or_params.params, state_or_params.batch_stats
  else:
    params = state_or_params
    if batch_stats is None:
      raise ValueError('export_backbone needs batch_stats when given params (or pass the '
                       'TrainState).')
  if 'backbone' in params:
    params = params['backbone']
  if 'backbone' in batch_stats:
    batch_stats = batch_stats['backbone']
  return params, batch_stats


def export_backbone(state_or_params, batch_stats, path: str, model_config=None) -> dict:
  """Writes the backbone as torchvision-named arrays to `path` (.npz) + a .json sidecar.

  Args:
    state_or_params: a TrainState (its query encoder is exported), or the
      params of an encoder (with a 'backbone' subtree) or of a backbone.
    batch_stats: the matching batch stats (ignored for a TrainState).
    path: output .npz path.
    model_config: config.model, recorded in the sidecar (optional).

  Returns:
    The exported {name: array} dict.
  """
  params, batch_stats = _backbone_trees(state_or_params, batch_stats)
  state = torchvision_state_dict(params, batch_stats)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  files.atomic_write(path, lambda f: np.savez(f, **state), binary=True)
  if model_config is not None:
    sidecar = os.path.splitext(path)[0] + '.json'
    with open(sidecar, 'w') as f:
      json.dump({'model': model_config.to_dict(), 'format': 'torchvision ResNet state_dict '
                 'without fc; conv weights OIHW'}, f, indent=2, sort_keys=True)
  return state


def run_export(config, workdir: str) -> str:
  """Exports the latest checkpoint's query backbone to WORKDIR/backbone_torchvision.npz.

  With several processes, every one restores and process 0 alone writes.
  """
  params, batch_stats, step = checkpoints.restore_query_encoder(workdir, config.model)
  path = os.path.join(workdir, 'backbone_torchvision.npz')
  if jax.process_index() == 0:
    export_backbone(params, batch_stats, path, config.model)
  results.write_results(workdir, {'export_step': step})
  return path
