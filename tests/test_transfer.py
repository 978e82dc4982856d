"""Transfer: detectron2 export against the official converter, official MoCo weights in.

The detectron2 golden (tests/data/detectron2_convert.npz, `tools/make_goldens.py
--only=detectron2`) holds our torchvision exports of two 2-step checkpoints and
what facebookresearch/moco's `detection/convert-pretrain-to-detectron2.py`,
run unedited, made of them. Renaming and transposing do no arithmetic, so the
values must match exactly.
"""

import copy
import functools
import io
import os
import pickle
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from moco_jax.core import errors
from moco_jax.core import parallel
from moco_jax.evaluation import export
from moco_jax.evaluation import frozen
from moco_jax.evaluation import knn
from moco_jax import models
from moco_jax import pretrain
from moco_jax.training import optim
from moco_jax.training import state as state_lib
from moco_jax.training import step as step_lib
from moco_jax.weights import official
from moco_jax.weights import torchvision_names

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
  params, batch_stats = torchvision_names.backbone_from_torchvision(exported, template['params'],
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
  assert {k: torchvision_names.detectron2_name(k) for k in expected} == expected


def test_unknown_export_format_is_one_config_error(tmp_path):
  config = _model_config('resnet_tiny', 4)
  config.export.format = 'onnx'
  with pytest.raises(errors.ConfigError, match=r'export\.format=.onnx.*torchvision.*detectron2'):
    export.run_export(config, str(tmp_path))


# --------------------------------------------------------------------------
# Official MoCo checkpoints in (config.init_from).

# The official v2 head is nn.Sequential(Linear, ReLU, Linear) (builder.py): fc.0 and fc.2.
_OFFICIAL_HEAD = {'fc1': 'fc.0', 'fc2': 'fc.2', 'fc': 'fc'}


def _official_state_dict(state, prefix='module.'):
  """What main_moco.py's state_dict holds for `state`, as NumPy: names, layouts, queue [dim, K]."""
  out = {}
  moco = state.method_state
  for side, params, stats in (('encoder_q', state.params, state.batch_stats),
                              ('encoder_k', moco.key_params, moco.key_batch_stats)):
    names = torchvision_names.torchvision_state_dict(params['backbone'], stats['backbone'])
    for name, layer in jax.device_get(params['head']).items():
      names[f'{_OFFICIAL_HEAD[name]}.weight'] = np.asarray(layer['kernel']).T  # [out, in].
      names[f'{_OFFICIAL_HEAD[name]}.bias'] = np.asarray(layer['bias'])
    out.update({f'{prefix}{side}.{k}': v for k, v in names.items()})
  out[f'{prefix}queue'] = np.asarray(moco.queue).T
  out[f'{prefix}queue_ptr'] = np.asarray([moco.queue_ptr], np.int64)
  return out


def _setup(config):
  lr = optim.create_learning_rate_fn(config, 4, 8)
  return step_lib.make_step_setup(config, jax.device_count(), optim.create_optimizer(config, lr))


def _init_state(config):
  """step.init_state's state, replicated on the 8-device test mesh."""
  return step_lib.init_state(config, _setup(config), parallel.make_mesh())


def _abstract_state(config):
  """Shapes and dtypes of init_state's state, without running (or compiling) it."""
  setup = _setup(config)
  return jax.eval_shape(functools.partial(
      state_lib.create_train_state, method=setup.method, tx=setup.tx,
      image_size=config.data.image_size), jax.random.PRNGKey(0))


def _random_state(config):
  """Random values of init_state's shapes: no network compiled."""
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape).astype(s.dtype)),
                      _abstract_state(config))


def _pretrained(fresh):
  """A state unlike `fresh` in every loaded field (key != query, queue pointer mid-way)."""
  moco = fresh.method_state
  return fresh.replace(
      params=jax.tree.map(lambda x: 1.5 * x - 0.01, fresh.params),
      batch_stats=jax.tree.map(lambda x: x + 0.5, fresh.batch_stats),
      method_state=moco.replace(
          key_params=jax.tree.map(lambda x: 0.5 * x + 0.01, moco.key_params),
          key_batch_stats=jax.tree.map(lambda x: x + 0.25, moco.key_batch_stats),
          queue=-moco.queue, queue_ptr=jnp.asarray(37, jnp.int32)))


@pytest.fixture(scope='module')
def tiny_state():
  """(config, fresh init_state state): compiled once for the module."""
  config = tiny.get_config()
  return config, _init_state(config)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


_FIELDS = ('params', 'batch_stats', 'method_state.key_params', 'method_state.key_batch_stats',
           'method_state.queue', 'method_state.queue_ptr')


def _field(state, dotted):
  return functools.reduce(getattr, dotted.split('.'), state)


def test_official_state_dict_round_trips_into_the_train_state_without_torch(tiny_state):
  config, fresh = tiny_state
  source = _pretrained(fresh)
  parts = official.split_state_dict(_official_state_dict(source))
  loaded = official.state_from_official(fresh, parts, config.model)
  for field in _FIELDS:
    _assert_trees_equal(_field(loaded, field), _field(source, field))
    for x, y in zip(jax.tree.leaves(_field(loaded, field)),
                    jax.tree.leaves(_field(fresh, field))):
      assert x.sharding == y.sharding and x.dtype == y.dtype  # Laid out as init_state made it.
  for field in ('step', 'rng', 'opt_state'):  # A new run's: the optimiser starts fresh.
    _assert_trees_equal(_field(loaded, field), _field(fresh, field))
  # Without DDP's 'module.' prefix, and without a queue (it stays the fresh one).
  bare = {k: v for k, v in _official_state_dict(source, prefix='').items() if 'queue' not in k}
  loaded = official.state_from_official(
      fresh, official.split_state_dict(bare), config.model)
  _assert_trees_equal(loaded.method_state.key_params, source.method_state.key_params)
  for field in ('queue', 'queue_ptr'):
    _assert_trees_equal(getattr(loaded.method_state, field), getattr(fresh.method_state, field))


def test_official_v1_linear_head_loads_into_a_linear_config():
  config = tiny.get_config()
  config.model.head = 'linear'
  fresh = _random_state(config)
  source = _pretrained(fresh)
  assert set(source.params['head']) == {'fc'}
  parts = official.split_state_dict(_official_state_dict(source))
  assert set(parts['encoder_q']) >= {'fc.weight', 'fc.bias'} and parts['queue'].shape == (200, 16)
  loaded = official.state_from_official(fresh, parts, config.model)
  for field in _FIELDS:
    _assert_trees_equal(_field(loaded, field), _field(source, field))


@pytest.mark.parametrize('change,match', [
    (lambda c: setattr(c.model, 'width', 16),
     r'encoder_q\): bn1\.bias: torchvision shape \(8,\) does not match \(16,\).*resnet_tiny.*'
     r'width 8.*width 16.*--config\.model'),
    (lambda c: setattr(c.model, 'head', 'linear'),
     r'fc\.weight is missing.*head layers \[.fc\.0., .fc\.2.\]: --config\.model\.head=mlp'),
    (lambda c: setattr(c.model, 'head_hidden_dim', 32),
     r'fc\.0\.weight has shape \(64, 64\), the config.s head needs \(32, 64\)'),
    (lambda c: setattr(c.moco, 'queue_size', 64),
     r'module\.queue holds 200 keys of dim 16.*--config\.moco\.queue_size=200'),
])
def test_official_checkpoint_of_another_architecture_is_one_line_naming_the_key(tiny_state, change,
                                                                               match):
  config, fresh = tiny_state
  parts = official.split_state_dict(_official_state_dict(fresh), 'f.pth')
  config = copy.deepcopy(config)
  change(config)
  with pytest.raises(errors.CheckpointError, match=match) as info:
    official.state_from_official(_abstract_state(config), parts, config.model, 'f.pth')
  assert "config.init_from='f.pth'" in str(info.value) and '\n' not in str(info.value)


def test_not_a_moco_checkpoint_and_missing_torch_are_one_line(tmp_path):
  with pytest.raises(errors.CheckpointError, match=r'no module\.encoder_q.*main_lincls'):
    official.split_state_dict({'module.conv1.weight': np.zeros((4, 3, 7, 7))}, 'l.pth')
  with pytest.raises(errors.CheckpointNotFoundError, match=r'init_from=.*no such file'):
    official.read_checkpoint(str(tmp_path / 'absent.pth.tar'))
  path = tmp_path / 'moco.pth.tar'
  path.write_bytes(b'not read')
  with mock.patch.dict(sys.modules, {'torch': None}):  # `import torch` raises ImportError.
    with pytest.raises(errors.ConfigError, match=r'needs torch.*pip install torch'):
      official.read_checkpoint(str(path))


def test_a_checkpoint_in_the_workdir_wins_over_init_from(tmp_path):
  config = tiny.get_config()
  config.init_from = str(tmp_path / 'never_read.pth.tar')  # Reading it would fail.
  os.makedirs(tmp_path / 'w' / 'checkpoints' / '4')
  assert pretrain.released_weights_for_new_run(config, str(tmp_path / 'w')) is None


class _Unsafe:
  """Not a tensor nor a container: torch's weights-only loader must refuse to build it."""


def test_official_file_restores_evaluates_and_refuses_pickled_code(tmp_path, tiny_state):
  torch = pytest.importorskip('torch')
  config, fresh = tiny_state
  config = copy.deepcopy(config)
  config.eval.batch_size = 64
  source = _pretrained(fresh)
  path = str(tmp_path / 'checkpoint_0199.pth.tar')
  state_dict = {k: torch.from_numpy(np.array(v))  # A writable copy.
                for k, v in _official_state_dict(source).items()}
  torch.save({'epoch': 200, 'arch': 'resnet_tiny', 'state_dict': state_dict,
              'optimizer': {'state': {}, 'param_groups': [{'lr': 0.03, 'momentum': 0.9}]}}, path)
  config.init_from = path
  workdir = str(tmp_path / 'w')
  os.makedirs(workdir)
  # Continue pretraining: the new run's state holds the file's encoders and queue.
  loaded = official.state_from_official(
      fresh, pretrain.released_weights_for_new_run(config, workdir), config.model, path)
  for field in _FIELDS:
    _assert_trees_equal(_field(loaded, field), _field(source, field))
  # Evaluate: no checkpoint in the workdir, so kNN runs on the file's query backbone and
  # gives what the same evaluator gives on the source state's.
  _, variables, step, prefix = frozen.load_backbone(config, workdir)
  _assert_trees_equal(variables, frozen.backbone_variables(source.params, source.batch_stats))
  assert (step, prefix) == (0, '')
  scores = knn.run_knn(config, workdir)
  expected = knn.KnnEvaluator(config, parallel.make_mesh())(jax.device_get(variables))
  assert scores == {'knn_top1': expected, 'knn_step': 0}
  # A file that would run code when unpickled is refused, in one line.
  torch.save({'state_dict': state_dict, 'extra': _Unsafe()}, path)
  with pytest.raises(errors.CheckpointError, match=r'weights_only=True.*never pickled code'):
    official.read_checkpoint(path)


def test_docs_detectron2_snippet_parses_and_normalises_as_our_config():
  yaml = pytest.importorskip('yaml')
  with open(os.path.join(os.path.dirname(_DATA), '..', 'docs', 'transfer.md')) as f:
    text = f.read()
  snippet = yaml.safe_load(text.split('```yaml\n', 1)[1].split('```', 1)[0])
  config = tiny.get_config()
  model = snippet['MODEL']
  np.testing.assert_allclose(model['PIXEL_MEAN'], 255 * np.asarray(config.aug.mean), atol=1e-9)
  np.testing.assert_allclose(model['PIXEL_STD'], 255 * np.asarray(config.aug.std), atol=1e-9)
  assert snippet['INPUT']['FORMAT'] == 'RGB' and model['RESNETS']['STRIDE_IN_1X1'] is False
  assert model['RESNETS']['NORM'] == 'naiveSyncBN' and model['WEIGHTS'].endswith(
      export.FORMATS['detectron2'][0])


def test_init_from_refuses_a_method_without_momentum_encoder_and_queue():
  config = tiny.get_config()
  fresh = _random_state(config)
  parts = official.split_state_dict(_official_state_dict(fresh), 'f.pth')
  other = fresh.replace(method_state=())  # e.g. a method with no momentum encoder nor queue.
  with pytest.raises(errors.ConfigError, match=r'MoCo v1/v2 checkpoint.*--config\.method=moco'):
    official.state_from_official(other, parts, config.model, 'f.pth')


def test_a_missing_init_from_file_fails_before_the_state_is_built(tmp_path):
  from moco_jax import pretrain  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.init_from = str(tmp_path / 'moco_v2_800ep_pretrain.pth.tar')
  with mock.patch.object(step_lib, 'init_state', side_effect=AssertionError('compiled first')), \
      pytest.raises(errors.CheckpointNotFoundError, match=r'init_from=.*no such file'):
    pretrain.train_and_evaluate(config, str(tmp_path / 'w'))
