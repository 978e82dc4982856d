"""Export of the pretrained backbone: torchvision names (.npz) or detectron2's pickle.

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

`config.export.format=detectron2` writes WORKDIR/backbone_detectron2.pkl instead:
the same arrays under the names facebookresearch/moco's
`detection/convert-pretrain-to-detectron2.py` gives them, in its pickle
`{"model": {name: np.ndarray}, "__author__": "MOCO", "matching_heuristics": True}`,
which detectron2's checkpointer reads as is (config snippet: docs/transfer.md).
Plain NumPy in a pickle: reading it needs no torch. The names, both ways, are
`moco_jax.weights.torchvision_names`.


`config.export.format=safetensors` writes WORKDIR/backbone.safetensors: the
torchvision arrays in the safetensors format (no pickle, memory-mappable),
whose key names are also timm's for its `resnet18/34/50` (timm keeps
torchvision's layout: conv1, bn1, layerN.B.convK, downsample.0/1). Both load
it with strict key matching once the classifier is removed
(`model.fc = torch.nn.Identity()`; timm: `create_model('resnet50', num_classes=0)`):

  from safetensors.torch import load_file
  model.load_state_dict(load_file('backbone.safetensors'))

Its metadata (strings) carries the model config and the normalisation.
"""

import json
import os
import pickle
import tempfile

from absl import logging
import jax
import numpy as np

from moco_jax.core import errors
from moco_jax.core import files
from moco_jax.evaluation import frozen
from moco_jax.evaluation import results
from moco_jax import models
from moco_jax.weights import torchvision_names

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


FORMATS = {  # export.format -> (file name in WORKDIR, what the sidecar says it is).
    'torchvision': ('backbone_torchvision.npz',
                    'torchvision ResNet state_dict without fc; conv weights OIHW'),
    'detectron2': ('backbone_detectron2.pkl',
                   'detectron2 pickle of detection/convert-pretrain-to-detectron2.py '
                   '(facebookresearch/moco) without fc; conv weights OIHW'),
    'safetensors': ('backbone.safetensors',
                    'safetensors of the torchvision / timm ResNet state_dict without fc; conv '
                    'weights OIHW'),
}


def write_safetensors(state: dict, path: str, metadata: dict) -> None:
  """`state` as a .safetensors file (written beside `path`, then renamed over it)."""
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  # Not np.ascontiguousarray: it makes num_batches_tracked (0-d, as in torch) 1-d.
  arrays = {k: np.array(v, order='C') for k, v in state.items()}
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, suffix='.tmp')
  os.close(fd)
  try:
    safetensors_numpy.save_file(arrays, tmp, metadata={k: str(v) for k, v in metadata.items()})
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def export_backbone(state_or_params, batch_stats, path: str, model_config=None,
                    export_format: str = 'torchvision', metadata=None) -> dict:
  """Writes the backbone to `path` in `export_format` + a .json sidecar.

  Args:
    state_or_params: a TrainState (its query encoder is exported), or the
      params of an encoder (with a 'backbone' subtree) or of a backbone.
    batch_stats: the matching batch stats (ignored for a TrainState).
    path: output path (.npz for torchvision, .pkl for detectron2).
    model_config: config.model, recorded in the sidecar (optional).
    export_format: a key of `FORMATS`.
    metadata: extra facts for the sidecar (and the safetensors header), e.g.
      the normalisation.

  Returns:
    The exported {name: array} dict (torchvision names for both formats).
  """
  check_format(export_format)
  params, batch_stats = _backbone_trees(state_or_params, batch_stats)
  state = torchvision_names.torchvision_state_dict(params, batch_stats)
  files.make_dir(os.path.dirname(os.path.abspath(path)), 'the export')
  facts = {'format': FORMATS[export_format][1], **(metadata or {})}
  if model_config is not None:
    facts['model'] = model_config.to_dict()
  if export_format == 'safetensors':
    write_safetensors(state, path, {k: json.dumps(v) if not isinstance(v, str) else v
                                    for k, v in facts.items()})
  elif export_format == 'detectron2':
    checkpoint = torchvision_names.detectron2_checkpoint(state)
    files.atomic_write(path, lambda f: pickle.dump(checkpoint, f), binary=True)
  else:
    files.atomic_write(path, lambda f: np.savez(f, **state), binary=True)
  if model_config is not None:
    # No command of this program reads an export back; the sidecar carries the file's
    # sha256 so that whoever does (a transfer job, a model registry) can check it.
    sidecar = os.path.splitext(path)[0] + '.json'
    facts = dict(facts, sha256=files.sha256_of(path))
    files.atomic_write(sidecar, lambda f: json.dump(facts, f, indent=2, sort_keys=True))
  return state


def check_format(export_format: str):
  """ConfigError naming export.format unless it is one of `FORMATS`."""
  if not isinstance(export_format, str) or export_format not in FORMATS:
    raise errors.ConfigError(f'config.export.format={export_format!r} is not one of '
                             f'{" | ".join(FORMATS)}: set --config.export.format=torchvision '
                             '(.npz), detectron2 (.pkl) or safetensors (.safetensors).')


def normalisation(config) -> dict:
  """What a consumer must feed the backbone: input channels and per-channel mean / std (0-1)."""
  channels = int(config.data.get('channels', 3))
  facts = {'in_channels': channels, 'mean': list(config.aug.mean),
           'std': list(config.aug.std), 'image_size': int(config.data.image_size)}
  if channels != 3:  # conv1 holds the real C-channel kernel [64, C, k, k].
    facts['consumers'] = (
        f'conv1.weight takes {channels} channels: timm loads it with create_model(name, '
        f'in_chans={channels}, num_classes=0); torchvision after model.conv1 = '
        f'torch.nn.Conv2d({channels}, 64, 7, 2, 3, bias=False) (3x3 stride 1 for the CIFAR '
        'stem) and model.fc = Identity(); detectron2 needs MODEL.PIXEL_MEAN / PIXEL_STD with '
        f'{channels} values (x255) and a {channels}-channel input; the official detectron2 '
        'converter and RGB-only tools do not accept it.')
  return facts


def run_export(config, workdir: str) -> str:
  """Exports the latest checkpoint's query backbone to WORKDIR/backbone_<format>.<ext>.

  With no checkpoint in WORKDIR and config.init_from set, the official
  checkpoint's query backbone is exported (a converter for released weights).

  config.export.format picks the format (`FORMATS`). With several processes,
  every one restores and process 0 alone writes.
  """
  export_format = config.get('export', {}).get('format', 'torchvision')
  check_format(export_format)  # Before the restore: a typo costs no time.
  if models.is_vit(config.model):
    raise errors.ConfigError(
        f'--mode=export writes a ResNet ({export_format}); config.model.name='
        f'{config.model.name!r} is a ViT: read params["backbone"] from the checkpoint instead '
        '(docs/mocov3.md).')
  params, batch_stats, step = frozen.query_encoder(config, workdir)
  path = os.path.join(workdir, FORMATS[export_format][0])
  if export_format == 'detectron2' and config.model.stem != 'imagenet':
    logging.warning('model.stem=%r: detectron2\'s ResNet has the 7x7 ImageNet stem, so this '
                    'conv1 will not load there (docs/transfer.md).', config.model.stem)
  if jax.process_index() == 0:
    export_backbone(params, batch_stats, path, config.model, export_format,
                    metadata=normalisation(config))
  results.write_results(workdir, {'export_step': step})
  return path
