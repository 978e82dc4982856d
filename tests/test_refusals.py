"""A refusal changes nothing (issue 32, item 1): every refusal a run can meet leaves WORKDIR
byte-identical (or absent, if it was), and config.json is written only once a run is accepted."""

import hashlib
import os

import pytest

from configs import tiny
from moco_jax.core import errors
from moco_jax.training import train


def _digest(directory) -> dict:
  """{relative path: sha256 of the file, or 'dir' / 'link -> target'} of everything under it."""
  if not os.path.lexists(directory):
    return {'<absent>': ''}
  out = {}
  for root, dirs, names in os.walk(directory):
    for name in dirs + names:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory)
      if os.path.islink(path):
        out[rel] = f'link -> {os.readlink(path)}'
      elif os.path.isdir(path):
        out[rel] = 'dir'
      else:
        with open(path, 'rb') as f:
          out[rel] = hashlib.sha256(f.read()).hexdigest()
  return out


def _config(**overrides):
  config = tiny.get_config()
  config.num_train_steps = config.checkpoint_every_steps = 2
  config.log_every_steps = 1
  config.tensorboard = False
  for field, value in overrides.items():
    section, _, name = field.rpartition('.')
    (config[section] if section else config)[name] = value
  return config


def _refused(config, workdir, error=errors.UserError, match=None):
  before = _digest(workdir)
  with pytest.raises(error, match=match):
    train.train_and_evaluate(config, str(workdir))
  assert _digest(workdir) == before, 'a refused run changed WORKDIR'


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A finished 2-step run: the WORKDIR every resume refusal below is tried on."""
  workdir = tmp_path_factory.mktemp('refusals') / 'run'
  train.train_and_evaluate(_config(), str(workdir))
  assert (workdir / 'config.json').exists() and (workdir / 'checkpoints' / '2').is_dir()
  return workdir


# Each refusal of a resume: the config comparison, the method-state shapes, the step beyond
# the config's length, the config checks, an unreadable init_from (ignored when resuming:
# the checkpoint wins, so it is no refusal and not listed).
RESUME_REFUSALS = {
    'changed seed': ({'seed': 7}, 'Refusing to resume'),
    'changed batch': ({'batch_size': 32}, 'Refusing to resume'),
    'changed model width': ({'model.width': 16}, 'Refusing to resume'),
    'changed image size': ({'data.image_size': 16, 'data.cache_size': -1}, 'Refusing to resume'),
    'changed data': ({'data.synthetic_examples': 128}, 'Refusing to resume'),
    'changed method': ({'method': 'end_to_end'}, 'Refusing to resume'),
    'queue shape, change allowed': ({'moco.queue_size': 300, 'allow_config_change': True},
                                    'queue'),
    'width, change allowed': ({'model.width': 16, 'allow_config_change': True}, None),
    'beyond the run': ({'num_train_steps': 1, 'checkpoint_every_steps': 1},
                       'beyond the 1 steps'),
    'bad value': ({'optim.base_lr': float('nan')}, 'config.optim.base_lr'),
    'too small a dataset': ({'batch_size': 512, 'moco.queue_size': 1024,
                             'allow_config_change': True}, 'larger than the training split'),
}


@pytest.mark.parametrize('name', sorted(RESUME_REFUSALS))
def test_a_refused_resume_leaves_workdir_byte_identical(trained, name):
  overrides, match = RESUME_REFUSALS[name]
  _refused(_config(**overrides), trained, match=match)


NEW_RUN_REFUSALS = {
    'bad value': ({'model.name': 'vit_small'}, 'config.model.name'),
    'too small a dataset': ({'batch_size': 512, 'moco.queue_size': 1024},
                            'larger than the training split'),
    'missing init_from': ({'init_from': '/nonexistent/moco_v2_800ep.pth.tar'},
                          'moco_v2_800ep'),
    'missing folder': ({'data.path': '/nonexistent/imagenette'}, 'nonexistent'),
}


@pytest.mark.parametrize('name', sorted(NEW_RUN_REFUSALS))
def test_a_refused_new_run_creates_nothing(tmp_path, name):
  overrides, match = NEW_RUN_REFUSALS[name]
  workdir = tmp_path / 'new' / 'run'
  _refused(_config(**overrides), workdir, match=match)
  assert not (tmp_path / 'new').exists()


@pytest.mark.parametrize('blocker', ['file', 'checkpoints file', 'dangling link'])
def test_an_unwritable_workdir_is_refused_without_writing(tmp_path, blocker):
  workdir = tmp_path / 'run'
  if blocker == 'file':
    workdir.write_text('not a directory')
  elif blocker == 'checkpoints file':
    workdir.mkdir()
    (workdir / 'checkpoints').write_text('')
  else:
    workdir.symlink_to(tmp_path / 'gone')
  _refused(_config(), workdir, errors.CheckpointError, 'is not a writable directory')
