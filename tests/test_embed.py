"""--mode=embed (features of every image to a .npy + index) and the safetensors export."""

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import tiny
from moco_jax import models
from moco_jax.core import errors
from moco_jax.core import parallel
from moco_jax.data import sources
from moco_jax.evaluation import embed
from moco_jax.evaluation import export
from moco_jax.evaluation import feature_store
from moco_jax.evaluation import features
from moco_jax.evaluation import frozen

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')


# --------------------------------------------------------------------------
# safetensors under torchvision / timm names.


def _reference_keys():
  with open(os.path.join(DATA, 'resnet50_state_dict_keys.json')) as f:
    return json.load(f)


@pytest.mark.parametrize('library', ['torchvision.models.resnet50', 'timm.resnet50'])
def test_safetensors_export_matches_resnet50_keys_strictly(tmp_path, library):
  """Every key of the library's resnet50 except fc, with its shape, and nothing else."""
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.model.name, config.model.width, config.model.stem = 'resnet50', 64, 'imagenet'
  backbone = models.create_backbone(config.model)
  shapes = jax.eval_shape(lambda: backbone.init(jax.random.PRNGKey(0),
                                                jnp.zeros((1, 64, 64, 3)), train=False))
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  path = str(tmp_path / 'backbone.safetensors')
  export.export_backbone(variables['params'], variables['batch_stats'], path, config.model,
                         'safetensors', metadata=export.normalisation(config))
  loaded = safetensors_numpy.load_file(path)
  want = {k: v for k, v in _reference_keys()[library].items() if not k.startswith('fc.')}
  assert sorted(loaded) == sorted(want)
  assert {k: list(v.shape) for k, v in loaded.items()} == want
  assert loaded['bn1.num_batches_tracked'].dtype == np.int64


def test_safetensors_holds_the_npz_arrays_and_the_normalisation(tmp_path):
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  encoder = models.create_encoder(config.model)
  variables = encoder.init(jax.random.PRNGKey(3), jnp.zeros((1, 32, 32, 3)), train=False)
  npz = export.export_backbone(variables['params'], variables['batch_stats'],
                               str(tmp_path / 'a.npz'), config.model)
  path = str(tmp_path / 'b.safetensors')
  export.export_backbone(variables['params'], variables['batch_stats'], path, config.model,
                         'safetensors', metadata=export.normalisation(config))
  with safe_open(path, framework='numpy') as f:
    assert sorted(f.keys()) == sorted(npz)
    for key in npz:
      np.testing.assert_array_equal(f.get_tensor(key), npz[key])
    meta = f.metadata()
  assert json.loads(meta['mean']) == list(config.aug.mean)
  assert json.loads(meta['in_channels']) == 3
  assert json.loads(meta['model'])['name'] == 'resnet_tiny'


def test_an_unknown_export_format_names_the_three(tmp_path):
  with pytest.raises(errors.ConfigError, match='safetensors'):
    export.check_format('onnx')


# --------------------------------------------------------------------------
# Embeddings of a generated folder.


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
  """ROOT/{train,val}/cN/*.png: 3 classes x 9 train + 2 val, and one unreadable file."""
  root = tmp_path_factory.mktemp('embed') / 'tree'
  rng = np.random.default_rng(0)
  for split, count in (('train', 9), ('val', 2)):
    for c in range(3):
      folder = root / split / f'c{c}'
      folder.mkdir(parents=True)
      for i in range(count):
        image = rng.integers(0, 256, (20 + 3 * (i % 3), 24, 3), dtype=np.uint8)
        image[..., c] = 200
        Image.fromarray(image).save(folder / f'{i}.png')
  (root / 'train' / 'c1' / 'broken.png').write_bytes(b'not a png')
  return root


def _config(tree_path, tmp_path, **overrides):
  config = tiny.get_config()
  config.data.path = str(tree_path)
  config.data.image_size = 16
  config.data.cache_dir = str(tmp_path / 'cache')
  config.data.num_workers = 2
  config.eval.random_init = True  # The step-0 encoder: no training needed.
  config.eval.batch_size = 8  # 28 train files: 4 batches, the last one padded.
  for key, value in overrides.items():
    section, _, field = key.rpartition('.')
    (config[section] if section else config)[field] = value
  return config


def _index(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def _float16_bound(x):
  """|float16(x) - x| for float32 x: half an ulp, 2^-11 |x| (normal) or 2^-25 (subnormal)."""
  return np.maximum(np.abs(x) * 2.0**-11, 2.0**-25)


def test_embed_rows_are_the_in_memory_features_in_index_order(tree, tmp_path):
  config = _config(tree, tmp_path)
  workdir = str(tmp_path / 'run')
  path = embed.run_embed(config, workdir)
  rows = np.load(path, mmap_mode='r')
  assert isinstance(rows, np.memmap) and rows.dtype == np.float16
  index = _index(embed.embedding_paths(workdir, 'train')['index'])
  assert [int(r['row']) for r in index] == list(range(28)) and rows.shape[0] == 28
  assert sorted(r['path'] for r in index) == sorted(
      str(p) for p in (tree / 'train').rglob('*.png'))
  assert [r['readable'] for r in index].count('0') == 1
  broken = next(i for i, r in enumerate(index) if r['path'].endswith('broken.png'))
  assert index[broken]['readable'] == '0' and not np.asarray(rows[broken]).any()
  # The in-memory split drops the unreadable file and keeps the order of the rest.
  backbone, variables, _, _ = frozen.load_backbone(config, '')
  train_ds = sources.from_config(config).load('train')
  want = features.extract_features(config, backbone, variables, train_ds, parallel.make_mesh(),
                                   normalize=False)
  got = np.asarray(rows, np.float32)[[i for i in range(28) if i != broken]]
  assert np.all(np.abs(got - want) <= _float16_bound(want))
  labels = [r['label'] for i, r in enumerate(index) if i != broken]
  assert labels == [train_ds.class_names[j] for j in train_ds.labels]
  marker = json.load(open(embed.embedding_paths(workdir, 'train')['marker']))
  assert marker['shape'] == [28, want.shape[1]]
  assert not os.path.exists(embed.embedding_paths(workdir, 'train')['progress'])


def test_an_interrupted_embed_resumes_and_ends_identical(tree, tmp_path, monkeypatch):
  config = _config(tree, tmp_path, **{'embed.split': 'train'})
  whole = np.load(embed.run_embed(config, str(tmp_path / 'whole')))
  batches = feature_store.feature_batches
  starts = []

  def crash_after_two(*args, **kwargs):
    starts.append(args[-1] if len(args) > 5 else kwargs.get('start', 0))
    for n, item in enumerate(batches(*args, **kwargs)):
      if n == 2 and len(starts) == 1:
        raise KeyboardInterrupt('killed')
      yield item

  monkeypatch.setattr(feature_store, 'feature_batches', crash_after_two)
  workdir = str(tmp_path / 'crashed')
  with pytest.raises(KeyboardInterrupt):
    embed.run_embed(config, workdir)
  paths = embed.embedding_paths(workdir, 'train')
  assert json.load(open(paths['progress']))['rows'] == 16 and not os.path.exists(paths['marker'])
  np.testing.assert_array_equal(np.load(embed.run_embed(config, workdir)), whole)
  assert starts == [0, 16]  # The rerun started where the progress file said.
  assert embed.run_embed(config, workdir) and starts == [0, 16]  # Complete: nothing to do.


def test_embed_of_the_eval_split_and_a_bad_split_name(tree, tmp_path):
  config = _config(tree, tmp_path, **{'embed.split': 'eval'})
  rows = np.load(embed.run_embed(config, str(tmp_path / 'run')))
  assert rows.shape[0] == 6
  with pytest.raises(errors.ConfigError, match='embed.split'):
    embed.run_embed(_config(tree, tmp_path, **{'embed.split': 'test'}), str(tmp_path / 'x'))
