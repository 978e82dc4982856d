"""Configs: every shipped config validates; bad values fail early, naming the field."""

import importlib
import math
import os
import subprocess
import sys

import pytest

import helpers
from configs import imagenet_ablation
from configs import tiny
from configs import writeup
from moco_jax import config_checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ['default', 'tiny', 'imagenette', 'imagewoof', 'imagenet', 'cifar10', 'mocov1',
           'imagenet_ablation', 'writeup']


@pytest.mark.parametrize('name', CONFIGS)
def test_shipped_configs_validate(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  config_checks.validate(config, num_devices=8)


@pytest.mark.parametrize('field,value,needle', [
    ('batch_size', 60, 'config.batch_size=60 is not divisible by the 8 devices'),
    ('optim.base_lr', 0.0, 'config.optim.base_lr'),
    ('optim.base_lr', -1.0, 'config.optim.base_lr'),
    ('moco.temperature', 0.0, 'config.moco.temperature'),
    ('moco.momentum', 1.0, 'config.moco.momentum'),
    ('moco.momentum', -0.1, 'config.moco.momentum'),
    ('moco.queue_size', 32, 'config.moco.queue_size=32 must be >= config.batch_size=64'),
    ('moco.bn_mode', 'group', "config.moco.bn_mode='group'"),
    ('moco.bn_splits', 3, 'config.moco.bn_splits=3'),
    ('model.name', 'vgg', "config.model.name='vgg'"),
    ('model.dtype', 'float16', "config.model.dtype='float16'"),
    ('optim.schedule', 'linear', "config.optim.schedule='linear'"),
    ('optim.name', 'rmsprop', "config.optim.name='rmsprop' is not one of"),
    ('model.head_dims', (64, 32), 'ends in 32, but config.model.embed_dim=16'),
    ('model.head_dims', (16,), 'has no hidden layer'),
    ('model.head_dims', (8, 0, 16), 'must be a list of positive widths'),
    # Checked before any work, not after the run (issue 11).
    ('method', 'simclr',
     "config.method='simclr' is not one of ['end_to_end', 'memory_bank', 'moco', 'mocov3']"),
    ('num_train_steps', -5, 'config.num_train_steps=-5 must be -1'),
    ('keep_checkpoints', 0, 'config.keep_checkpoints=0 must be >= 1'),
    ('eval.knn_k', 0, 'config.eval.knn_k=0 must be > 0'),
    ('eval.knn_temperature', 0.0, 'config.eval.knn_temperature=0.0 must be > 0'),
    ('eval.linear_epochs', 0, 'config.eval.linear_epochs=0 must be > 0'),
    ('eval.linear_schedule', 'poly', "config.eval.linear_schedule='poly'"),
    ('eval.linear_step_epochs', (80, 60), 'config.eval.linear_step_epochs=(80, 60) must be ascending'),
    ('eval.knn_every_epochs', -2, 'config.eval.knn_every_epochs=-2'),
    ('data.cache_size', 16, 'config.data.cache_size=16 must be -1 (= image_size x cache_ratio) or >= '
     'config.data.image_size=32'),
    ('data.num_workers', 0, 'config.data.num_workers=0 must be >= 1'),
    ('data.stream_crops', 'gpu', "config.data.stream_crops='gpu' must be 'device'"),
    ('data.canvas_side', -1, 'config.data.canvas_side=-1 must be >= 1 (px)'),
    ('data.decoder', 'turbojpeg', "config.data.decoder='turbojpeg' must be 'pillow' or "
     "'simplejpeg'"),
    ('aug.crop_scale', (1.0, 0.2), 'config.aug.crop_scale=(1.0, 0.2) must be (min, max)'),
    ('aug.crop_scale', (0.2, 1.5), 'config.aug.crop_scale=(0.2, 1.5)'),
    ('aug.crop_ratio', (0.0, 1.0), 'config.aug.crop_ratio=(0.0, 1.0)'),
    ('aug.blur_sigma', (2.0, 0.1), 'config.aug.blur_sigma=(2.0, 0.1)'),
    ('aug.jitter', (0.4, 0.4, 0.4, 0.7), 'hue <= 0.5'),
    ('aug.jitter_prob', 1.5, 'config.aug.jitter_prob=1.5 must be a probability in [0, 1]'),
    ('aug.blur_prob', -0.1, 'config.aug.blur_prob=-0.1 must be a probability'),
    ('aug.std', (0.2, 0.0, 0.2), 'config.aug.std=(0.2, 0.0, 0.2) must be 3 numbers > 0'),
    ('optim.base_lr', float('nan'), 'config.optim.base_lr=nan must be > 0'),
    ('optim.step_epochs', (160, 120), 'config.optim.step_epochs=(160, 120) must be ascending'),
    ('model.dtype', 'float64', "config.model.dtype='float64' needs JAX_ENABLE_X64=1"),
])
def test_bad_values_are_rejected_with_the_field_name(field, value, needle):
  config = tiny.get_config()
  section, _, name = field.rpartition('.')
  (config[section] if section else config)[name] = value
  with pytest.raises(config_checks.ConfigError, match=None) as info:
    config_checks.validate(config, num_devices=8)
  assert needle in str(info.value)


def test_default_shuffle_bn_groups_must_divide_the_device_batch():
  config = tiny.get_config()  # bn_splits=-1: 8 groups on one device, 1 on each of 8.
  config.batch_size = 60
  with pytest.raises(config_checks.ConfigError, match='8 BatchNorm groups per device'):
    config_checks.validate(config, num_devices=1)
  config.batch_size = 64
  config_checks.validate(config, num_devices=1)
  config.moco.bn_mode = 'sync'  # One group: any batch the devices divide works.
  config.batch_size = 60
  config_checks.validate(config, num_devices=1)


def test_ablation_rows():
  v1 = imagenet_ablation.get_config('v1')
  assert (v1.model.head, v1.moco.temperature, v1.aug.blur_prob, v1.optim.schedule) == (
      'linear', 0.07, 0.0, 'step')
  v2 = imagenet_ablation.get_config('mlp,aug+,cos')
  assert (v2.model.head, v2.moco.temperature, v2.aug.blur_prob, v2.optim.schedule) == (
      'mlp', 0.2, 0.5, 'cosine')
  with pytest.raises(ValueError, match='unknown'):
    imagenet_ablation.get_config('mlp,bigger')


def test_writeup_recipe():
  for dataset in ('imagenette', 'imagewoof'):
    config = writeup.get_config(dataset)
    assert tuple(config.model.head_dims) == (100, 50, 25) and config.model.embed_dim == 25
    assert (config.moco.temperature, config.moco.queue_size, config.moco.momentum) == (
        0.05, 8192, 0.999)
    assert (config.optim.name, config.optim.base_lr, config.optim.weight_decay) == (
        'adam', 1e-3, 1e-6)
    assert config.batch_size == 256 and config.model.name == 'resnet18'
  assert writeup.get_config('imagewoof').data.name.startswith('imagewoof')
  with pytest.raises(ValueError, match='imagewoof'):
    writeup.get_config('cifar10')


def test_head_dims_need_the_mlp_head():
  config = tiny.get_config()
  config.model.head = 'linear'
  config.model.head_dims = (32, 16)
  with pytest.raises(config_checks.ConfigError, match="needs config.model.head='mlp'"):
    config_checks.validate(config, num_devices=8)


def _main(*args):
  env = dict(os.environ, XLA_FLAGS=helpers.xla_flags(8),
             JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, 'main.py', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_overrides_reach_validation_before_compiling(tmp_path):
  result = _main('--config=configs/tiny.py', f'--workdir={tmp_path}',
                 '--config.moco.temperature=-0.5')
  assert result.returncode != 0
  assert 'config.moco.temperature=-0.5 must be > 0' in result.stderr
  assert not (tmp_path / 'checkpoints').exists()  # Failed before any work.


@pytest.mark.slow
def test_cli_rejects_unknown_fields(tmp_path):
  result = _main('--config=configs/tiny.py', f'--workdir={tmp_path}', '--config.moco.queue=4')
  assert result.returncode != 0
  assert 'queue' in result.stderr


# --- Every field of configs/default.py, walked with bad values (issue 32, item 6) -------------

def _leaves(tree, prefix=''):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def _bad_values(value) -> dict:
  wrong = 3 if isinstance(value, str) else ('yes' if isinstance(value, bool) else 'x')
  return {'nan': float('nan'), 'inf': float('inf'), 'negative': -3, 'zero': 0,
          'empty': () if isinstance(value, (tuple, list)) else '', 'wrong_type': wrong}


# (field, kind) -> why the value is a valid setting (the field's comment in configs/default.py).
ACCEPTED = {
    **{(f'aug.{p}', 'zero'): 'probability 0: the op is off'
       for p in ('blur_prob', 'grayscale_prob', 'jitter_prob', 'solarize_prob',
                 'second_view_blur_prob', 'second_view_solarize_prob')},
    ('data.cache_dir', 'empty'): "'' = ~/.cache/moco_jax",
    ('data.val_fraction', 'zero'): '0: no held-out eval split (an eval folder, or none)',
    ('data.data_dir', 'empty'): "'' = tfds default",
    ('data.path', 'empty'): "'' = no folder (source=tfds here)",
    ('init_from', 'empty'): "'' = no official checkpoint",
    ('compile_cache_dir', 'empty'): "'' = no persistent compilation cache",
    ('data.max_in_memory_gb', 'zero'): '0: always stream',
    ('data.stream_processes', 'zero'): '0: no grain worker processes',
    ('data.canvas_side', 'zero'): '0: auto (512, or 1.5 x a packed copy\'s pack side)',
    ('eval.knn_every_epochs', 'zero'): '0: kNN only at the end',
    ('eval.linear_step_epochs', 'empty'): 'no lr step',
    ('optim.step_epochs', 'empty'): 'no lr step',
    ('eval.linear_weight_decay', 'zero'): 'paper: 0',
    ('optim.weight_decay', 'zero'): 'no decay',
    ('optim.momentum', 'zero'): 'plain SGD',
    ('optim.warmup_epochs', 'zero'): 'no warm-up',
    ('moco.momentum', 'zero'): 'key encoder = query encoder (MoCo v1 ablation m=0)',
    ('mocov3.momentum', 'zero'): 'as moco.momentum=0',
    ('memory_bank.momentum', 'zero'): 'the bank row is replaced by the new feature',
    ('model.head_dims', 'empty'): "() = v2's two layers",
    ('report.augment_step', 'zero'): 'the first step',
    ('report.tsne_points', 'zero'): '0: every eval image',
    ('seed', 'zero'): 'any seed in [0, 2^32)',
}
_METHOD_SECTIONS = ('moco', 'mocov3', 'end_to_end', 'memory_bank')


def _walk_cases():
  import configs.default as default_config  # pylint: disable=g-import-not-at-top
  for field, value in _leaves(default_config.get_config().to_dict()):
    for kind, bad in _bad_values(value).items():
      yield field, kind, bad


@pytest.mark.parametrize('field,kind,bad', list(_walk_cases()))
def test_every_default_field_with_bad_values(field, kind, bad):
  """NaN, inf, negative, zero, empty and wrong-type in every field: a one-line ConfigError naming
  the field, or an acceptance listed in ACCEPTED that the constructors then take; no traceback."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from configs import default as default_config  # pylint: disable=g-import-not-at-top
  from moco_jax.methods import registry  # pylint: disable=g-import-not-at-top
  from moco_jax.training import optim  # pylint: disable=g-import-not-at-top
  tree = default_config.get_config().to_dict()
  section = field.split('.')[0]
  if section in _METHOD_SECTIONS:  # A method's section is read when that method runs.
    tree['method'] = section
  node = tree
  for part in field.split('.')[:-1]:
    node = node[part]
  node[field.split('.')[-1]] = bad
  config = ml_collections.ConfigDict(tree)  # Built from a dict: no type safety in the way.
  try:
    config_checks.validate(config, num_devices=8)
  except config_checks.ConfigError as e:
    message = str(e)
    assert '\n' not in message
    assert f'config.{field}' in message or field.split('.')[-1] in message, message
    return
  assert (field, kind) in ACCEPTED, f'config.{field}={bad!r} was accepted without a reason'
  # Accepted: what the run builds from the config takes it.
  registry.create(config, 8, num_examples=1024)
  lr = optim.create_learning_rate_fn(config, 10, 100)
  optim.create_optimizer(config, lr)
  assert math.isfinite(float(lr(5)))
