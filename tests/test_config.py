"""Configs: every shipped config validates; bad values fail early, naming the field."""

import importlib
import os
import subprocess
import sys

import pytest

from configs import imagenet_ablation
from configs import tiny
from configs import writeup
from moco_jax.run import config_checks

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
    ('data.cache_size', 16, 'config.data.cache_size=16 must be -1 (= image_size) or >= '
     'config.data.image_size=32'),
    ('data.num_workers', 0, 'config.data.num_workers=0 must be >= 1'),
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
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
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
