"""Which network a tree of parameter shapes is: names for error messages, with no compute.

A checkpoint's metadata gives shapes only; `describe_backbone` turns them into
'resnet18 (stages [2, 2, 2, 2], stem cifar, width 64, 512 features)' or
'ViT (patch 16, width 384, depth 12)', so that a wrong architecture is said
in words before anything is restored.
"""

import re

import jax
import jax.numpy as jnp

from moco_jax import models


def flat_shapes(tree) -> dict:
  """{'layer1_0/conv1/kernel': (3, 3, 8, 8), ...} of a nested dict of arrays/metadata."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = '/'.join(str(getattr(p, 'key', p)) for p in path)
    out[key] = tuple(leaf.shape)
  return out


def describe_backbone(param_shapes: dict) -> str:
  """'resnet18 (stem cifar, width 16, 128 features)' from flat backbone param shapes."""
  patch = param_shapes.get('patch_kernel')
  if patch is not None:  # models/vit.py: patch_kernel [P, P, 3, D], blocks block0, block1, ...
    depth = len({k.split('/')[0] for k in param_shapes if k.startswith('block')})
    return f'ViT (patch {patch[0]}, width {patch[-1]}, depth {depth})'
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
  for arch, (sizes, block_cls) in models.ARCHS.items():
    if tuple(sizes) == stage_sizes and (block_cls is models.Bottleneck) == bottleneck:
      name = arch
  last = f'layer{len(stage_sizes)}_{stage_sizes[-1] - 1}/' if stage_sizes else ''
  out_kernel = param_shapes.get(last + ('conv3/kernel' if bottleneck else 'conv2/kernel'))
  features = out_kernel[-1] if out_kernel else '?'
  return (f'{name} (stages {list(stage_sizes)}, stem {stem}, width {stem_kernel[-1]}, '
          f'{features} features)')


def expected_backbone_shapes(model_config, channels: int = 3) -> dict:
  """Flat param shapes of the backbone `model_config` describes, on `channels` inputs."""
  backbone = models.create_backbone(model_config)
  dummy = jax.ShapeDtypeStruct((1, 32, 32, channels), jnp.float32)
  variables = jax.eval_shape(lambda x: backbone.init(jax.random.PRNGKey(0), x, train=False),
                             dummy)
  return flat_shapes(variables['params'])
