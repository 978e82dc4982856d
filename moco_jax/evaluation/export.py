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
"""

import json
import os
import pickle

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
}


def export_backbone(state_or_params, batch_stats, path: str, model_config=None,
                    export_format: str = 'torchvision') -> dict:
  """Writes the backbone to `path` in `export_format` + a .json sidecar.

  Args:
    state_or_params: a TrainState (its query encoder is exported), or the
      params of an encoder (with a 'backbone' subtree) or of a backbone.
    batch_stats: the matching batch stats (ignored for a TrainState).
    path: output path (.npz for torchvision, .pkl for detectron2).
    model_config: config.model, recorded in the sidecar (optional).
    export_format: a key of `FORMATS`.

  Returns:
    The exported {name: array} dict (torchvision names for both formats).
  """
  check_format(export_format)
  params, batch_stats = _backbone_trees(state_or_params, batch_stats)
  state = torchvision_names.torchvision_state_dict(params, batch_stats)
  files.make_dir(os.path.dirname(os.path.abspath(path)), 'the export')
  if export_format == 'detectron2':
    checkpoint = torchvision_names.detectron2_checkpoint(state)
    files.atomic_write(path, lambda f: pickle.dump(checkpoint, f), binary=True)
  else:
    files.atomic_write(path, lambda f: np.savez(f, **state), binary=True)
  if model_config is not None:
    sidecar = os.path.splitext(path)[0] + '.json'
    with open(sidecar, 'w') as f:
      json.dump({'model': model_config.to_dict(), 'format': FORMATS[export_format][1]}, f,
                indent=2, sort_keys=True)
  return state


def check_format(export_format: str):
  """ConfigError naming export.format unless it is one of `FORMATS`."""
  if not isinstance(export_format, str) or export_format not in FORMATS:
    raise errors.ConfigError(f'config.export.format={export_format!r} is not one of '
                             f'{" | ".join(FORMATS)}: set --config.export.format=torchvision '
                             '(.npz) or detectron2 (.pkl).')


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
    export_backbone(params, batch_stats, path, config.model, export_format)
  results.write_results(workdir, {'export_step': step})
  return path
