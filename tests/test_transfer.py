"""Transfer: detectron2 export against the official converter, official MoCo weights in.

The detectron2 golden (tests/data/detectron2_convert.npz, `tools/make_goldens.py
--only=detectron2`) holds our torchvision exports of two 2-step checkpoints and
what facebookresearch/moco's `detection/convert-pretrain-to-detectron2.py`,
run unedited, made of them. Renaming and transposing do no arithmetic, so the
values must match exactly.
"""

import io
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from moco_jax import models
from moco_jax.core import errors
from moco_jax.evaluation import export

_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
_GOLDEN_WIDTH = {'resnet18': 4, 'resnet50': 2}  # The golden checkpoints' model.width.


def _model_config(name, width, stem='imagenet'):
  config = tiny.get_config()
  config.model.name, config.model.width, config.model.stem = name, width, stem
  return config


def _backbone_template(model_config):
  backbone = models.create_backbone(model_config)
  return jax.eval_shape(lambda: backbone.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                              train=False))


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Refuses every class but NumPy's: proves the pickle needs no torch to read."""

  def find_class(self, module, name):
    if module.split('.')[0] != 'numpy':
      raise pickle.UnpicklingError(f'{module}.{name} is not NumPy')
    return super().find_class(module, name)


@pytest.mark.parametrize('arch', sorted(_GOLDEN_WIDTH))
def test_detectron2_export_equals_the_official_converter(tmp_path, arch):
  golden = np.load(os.path.join(_DATA, 'detectron2_convert.npz'))
  exported = {k.split('/input/')[1]: golden[k] for k in golden if k.startswith(f'{arch}/input/')}
  config = _model_config(arch, _GOLDEN_WIDTH[arch])
  template = _backbone_template(config.model)
  params, batch_stats = export.backbone_from_torchvision(exported, template['params'],
                                                         template['batch_stats'])
  path = os.path.join(tmp_path, 'backbone_detectron2.pkl')
  export.export_backbone({'backbone': params}, {'backbone': batch_stats}, path, config.model,
                         'detectron2')
  with open(path, 'rb') as f:
    ours = _NumpyOnlyUnpickler(io.BytesIO(f.read())).load()
  model = ours.pop('model')
  names = [str(n) for n in golden[f'{arch}/names']]
  assert sorted(model) == names
  assert [str(tuple(model[n].shape)) for n in names] == [str(s) for s in golden[f'{arch}/shapes']]
  assert [str(model[n].dtype) for n in names] == [str(d) for d in golden[f'{arch}/dtypes']]
  assert ours == {'__author__': 'MOCO', 'matching_heuristics': True}
  values = [k for k in golden if k.startswith(f'{arch}/values/')]
  assert len(values) >= 7
  for key in values:
    np.testing.assert_array_equal(model[key.split('/values/')[1]], golden[key])
  assert not os.path.exists(path + f'.tmp{os.getpid()}')  # Written through a rename.


def test_detectron2_names_follow_each_rule_of_the_converter():
  expected = {
      'conv1.weight': 'stem.conv1.weight',
      'bn1.running_var': 'stem.conv1.norm.running_var',
      'layer1.1.bn2.bias': 'res2.1.conv2.norm.bias',
      'layer4.2.bn3.weight': 'res5.2.conv3.norm.weight',
      'layer2.0.downsample.0.weight': 'res3.0.shortcut.weight',
      'layer3.0.downsample.1.running_mean': 'res4.0.shortcut.norm.running_mean',
  }
  assert {k: export.detectron2_name(k) for k in expected} == expected


def test_unknown_export_format_is_one_config_error(tmp_path):
  config = _model_config('resnet_tiny', 4)
  config.export.format = 'onnx'
  with pytest.raises(errors.ConfigError, match=r'export\.format=.onnx.*torchvision.*detectron2'):
    export.run_export(config, str(tmp_path))
