"""The one table between Flax ResNet variables and torchvision's `state_dict` names, both ways.

Export writes a backbone under torchvision's names (`torchvision_state_dict`)
and official checkpoints are read back through the same table
(`backbone_from_torchvision`, `moco_jax.weights.official`): one mapping, so
a round trip is the identity by construction (tests/test_export.py). The
detectron2 names are the official converter's replacements applied to these.
Convolution kernels are Flax HWIO and torch OIHW.
"""

import re

import jax
import numpy as np


# Flax BatchNorm variable -> torchvision BatchNorm2d buffer/parameter.
_BN_PARAMS = {'scale': 'weight', 'bias': 'bias'}
_BN_STATS = {'mean': 'running_mean', 'var': 'running_var'}


def torch_module_name(flax_path: tuple) -> str:
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


def torchvision_state_dict(params: dict, batch_stats: dict, dtype=np.float32) -> dict:
  """{torchvision key: np.ndarray} of a Flax backbone's params and batch stats.

  Args:
    params: the backbone's params (the 'backbone' subtree of an encoder).
    batch_stats: the backbone's BatchNorm running statistics.
    dtype: of the arrays (torchvision's float32; the equivalence test reads a
      float64 run in float64).
  """
  params = jax.device_get(params)
  batch_stats = jax.device_get(batch_stats)
  state = {}
  for path, leaves in _modules(params):
    name = torch_module_name(path)
    if 'kernel' in leaves:  # Convolution, HWIO -> OIHW.
      kernel = np.asarray(leaves['kernel'], dtype)
      if kernel.ndim != 4:
        raise ValueError(f'{"/".join(path)}/kernel has shape {kernel.shape}: expected a 4-D '
                         'convolution kernel; pass the backbone, not the head.')
      state[f'{name}.weight'] = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
    else:  # BatchNorm affine parameters.
      for flax_name, torch_name in _BN_PARAMS.items():
        state[f'{name}.{torch_name}'] = np.asarray(leaves[flax_name], dtype)
  for path, leaves in _modules(batch_stats):
    name = torch_module_name(path)
    for flax_name, torch_name in _BN_STATS.items():
      state[f'{name}.{torch_name}'] = np.asarray(leaves[flax_name], dtype)
    state[f'{name}.num_batches_tracked'] = np.asarray(0, np.int64)
  return state


def detectron2_name(torch_key: str) -> str:
  """A torchvision key as the official converter renames it (its replacements, in its order).

  'conv1.weight' -> 'stem.conv1.weight', 'bn1.running_mean' -> 'stem.conv1.norm.running_mean',
  'layer2.0.bn1.weight' -> 'res3.0.conv1.norm.weight', 'layer2.0.downsample.0.weight' ->
  'res3.0.shortcut.weight', 'layer2.0.downsample.1.bias' -> 'res3.0.shortcut.norm.bias'.
  """
  key = torch_key if 'layer' in torch_key else 'stem.' + torch_key
  for t in (1, 2, 3, 4):
    key = key.replace(f'layer{t}', f'res{t + 1}')
  for t in (1, 2, 3):
    key = key.replace(f'bn{t}', f'conv{t}.norm')
  return key.replace('downsample.0', 'shortcut').replace('downsample.1', 'shortcut.norm')


def detectron2_checkpoint(state: dict) -> dict:
  """The official converter's pickle object for a torchvision-named backbone `state`."""
  model = {detectron2_name(k): np.asarray(v) for k, v in state.items()}
  if len(model) != len(state):
    raise AssertionError('two torchvision keys map to one detectron2 key')
  return {'model': model, '__author__': 'MOCO', 'matching_heuristics': True}


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
      module = torch_module_name(prefix)
      names = _BN_STATS if stats else {'kernel': 'weight', **_BN_PARAMS}
      key = f'{module}.{names[name]}'
      value = np.asarray(state[key], np.float32)
      expected = tuple(leaf.shape)  # Kernels: ours HWIO, torchvision's OIHW.
      expected = tuple(expected[i] for i in (3, 2, 0, 1)) if name == 'kernel' else expected
      if value.shape != expected:
        raise ValueError(f'{key}: torchvision shape {value.shape} does not match {expected}: '
                         'another architecture or width.')
      if name == 'kernel':
        value = value.transpose(2, 3, 1, 0)
      out[name] = value
    return out

  return fill(params, (), False), fill(batch_stats, (), True)
