"""Writes tests/data/resnet50_state_dict_keys.json: torchvision's and timm's resnet50 keys.

  python tools/resnet_state_dict_keys.py

The lists are built from the published architectures, without torch or timm:
torchvision.models.resnet50 (He et al. 2016, torchvision's v1.5 Bottleneck,
layers [3, 4, 6, 3], expansion 4, `downsample = Sequential(conv1x1, BatchNorm2d)`
on the first block of each stage) and timm's `resnet50`, which keeps the same
module names (conv1, bn1, layerN.B.conv1..3, bn1..3, downsample.0/1, fc); its
`act*`, `drop_block`, `aa` and `global_pool` modules hold no tensors. Every
BatchNorm2d has weight, bias, running_mean, running_var, num_batches_tracked.
The export test compares `export.format=safetensors` against these lists with
strict key matching (fc removed, as both libraries load a backbone).
"""

import json
import os

LAYERS = (3, 4, 6, 3)
EXPANSION = 4


def _bn(name, channels):
  return {f'{name}.weight': [channels], f'{name}.bias': [channels],
          f'{name}.running_mean': [channels], f'{name}.running_var': [channels],
          f'{name}.num_batches_tracked': []}


def resnet50_keys(num_classes: int = 1000) -> dict:
  """{key: shape} of a resnet50 state_dict, in state_dict order."""
  keys = {'conv1.weight': [64, 3, 7, 7], **_bn('bn1', 64)}
  inplanes = 64
  for stage, blocks in enumerate(LAYERS, start=1):
    planes = 64 * 2**(stage - 1)
    for block in range(blocks):
      p = f'layer{stage}.{block}'
      keys[f'{p}.conv1.weight'] = [planes, inplanes, 1, 1]
      keys.update(_bn(f'{p}.bn1', planes))
      keys[f'{p}.conv2.weight'] = [planes, planes, 3, 3]
      keys.update(_bn(f'{p}.bn2', planes))
      keys[f'{p}.conv3.weight'] = [planes * EXPANSION, planes, 1, 1]
      keys.update(_bn(f'{p}.bn3', planes * EXPANSION))
      if block == 0:  # Stride or width change: a projection shortcut.
        keys[f'{p}.downsample.0.weight'] = [planes * EXPANSION, inplanes, 1, 1]
        keys.update(_bn(f'{p}.downsample.1', planes * EXPANSION))
      inplanes = planes * EXPANSION
  keys['fc.weight'] = [num_classes, inplanes]
  keys['fc.bias'] = [num_classes]
  return keys


def main():
  keys = resnet50_keys()
  assert len(keys) == 320, len(keys)  # len(torchvision.models.resnet50().state_dict()).
  out = {'torchvision.models.resnet50': keys, 'timm.resnet50': dict(keys)}
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests',
                      'data', 'resnet50_state_dict_keys.json')
  with open(path, 'w') as f:
    json.dump(out, f, indent=0)
  print(f'Wrote {path}: {len(keys)} keys each.')


if __name__ == '__main__':
  main()
