"""Evaluation of splits too large for memory: streamed features, blockwise kNN, the cache's key."""

import json
import logging
import os
from unittest import mock

import numpy as np
import pytest

import helpers
from moco_jax.core import errors
from moco_jax.core import parallel
from moco_jax.data import sources
from moco_jax.evaluation import feature_store
from moco_jax.evaluation import features
from moco_jax.evaluation import frozen
from moco_jax.evaluation import knn
from moco_jax.evaluation import linear_probe
from moco_jax.evaluation import report
from moco_jax.evaluation import results
from moco_jax import pretrain


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_blockwise_top_k_equals_a_plain_numpy_top_k():
  rng = np.random.default_rng(0)
  dim, num, k = 16, 301, 20
  bank = rng.normal(size=(num, dim)).astype(np.float32)
  bank[17] = bank[3]  # An exact tie across blocks: the lower index must come first.
  valid = rng.random(num) > 0.1
  queries = rng.normal(size=(37, dim)).astype(np.float32)
  queries[5] = bank[3]
  blocks = [(s, bank[s:s + 64], valid[s:s + 64]) for s in range(0, num, 64)]
  sims, idx = knn.blockwise_top_k(blocks, num, queries, k, chunk=16)
  # Reference: float64 cosine over the valid rows, a stable argsort (lower index first on ties).
  ref_sim = _unit(queries.astype(np.float64)) @ _unit(bank.astype(np.float64)).T
  ref_sim[:, ~valid] = -np.inf
  ref_idx = np.argsort(-ref_sim, axis=1, kind='stable')[:, :k]
  # float32 dot products of unit vectors in dimension D are off by <= ~D * 2^-24 each; the order
  # can only differ where two reference similarities are closer than that.
  bound = dim * 2.0**-23
  np.testing.assert_allclose(sims, np.take_along_axis(ref_sim, ref_idx, axis=1), atol=bound)
  gaps = np.diff(np.take_along_axis(ref_sim, np.argsort(-ref_sim, axis=1)[:, :k + 1], axis=1))
  clear = (np.abs(gaps) > 2 * bound).all(axis=1) | (np.arange(len(queries)) == 5)
  assert clear.sum() >= 30  # The comparison below covers most queries.
  np.testing.assert_array_equal(idx[clear], ref_idx[clear])
  assert list(idx[5][:2]) == [3, 17]  # The tie: both, lower index first.


def test_streamed_scores_equal_the_in_memory_vote():
  rng = np.random.default_rng(1)
  bank = _unit(rng.normal(size=(200, 8))).astype(np.float16)
  labels = rng.integers(0, 5, 200).astype(np.int32)
  queries = _unit(rng.normal(size=(30, 8))).astype(np.float32)
  stored = feature_store.StoredFeatures(bank, labels, np.ones(200, bool), list('abcde'), '')
  got = knn.knn_scores_streamed(stored, queries, 5, k=15, temperature=0.1, block=48)
  want = knn.knn_scores(_unit(bank.astype(np.float32)), labels, queries, 5, k=15,
                        temperature=0.1)
  np.testing.assert_allclose(got, want, rtol=1e-4)


# --------------------------------------------------------------------------
# On a generated folder small enough for both paths.


@pytest.fixture(scope='module')
def tree(tmp_path_factory):
  """ROOT/{train,val}/classN/*.jpg: 4 classes x 12 train + 4 val, each class its own tint."""
  root = helpers.image_tree(tmp_path_factory.mktemp('stream_eval') / 'tree',
                            {'train': 12, 'val': 4}, classes=4, class_name='class{}', blur=8,
                            tint=60)
  (root / 'train' / 'class1' / 'broken.jpg').write_bytes(b'not a jpeg')
  return root


def _config(tree_path, tmp_path, **overrides):
  # eval.batch_size 10: 49 train images make 5 batches, the last one padded.
  config = helpers.tiny_config(**{
      'data.path': str(tree_path), 'data.image_size': 16, 'data.cache_dir': str(tmp_path / 'cache'),
      'data.num_workers': 2, 'batch_size': 16, 'eval.random_init': True, 'eval.batch_size': 10,
      'eval.knn_k': 10, 'eval.linear_epochs': 3})
  return helpers.override(config, **overrides)


def test_streamed_knn_equals_the_in_memory_knn(tree, tmp_path, caplog):
  memory = knn.run_knn(_config(tree, tmp_path), str(tmp_path / 'memory'))
  with caplog.at_level(logging.INFO):
    streamed = knn.run_knn(_config(tree, tmp_path, **{'data.max_in_memory_gb': 0.0}),
                           str(tmp_path / 'streamed'))
  assert any('streaming it' in r.getMessage() for r in caplog.records)
  assert any('48 train / 16 eval images, streamed' in r.getMessage() for r in caplog.records)
  assert streamed == memory
  # The stored features are the in-memory ones rounded to float16 (the broken file is invalid).
  config = _config(tree, tmp_path)
  backbone, variables, _, _ = frozen.load_backbone(config, '')
  train_ds = sources.from_config(config).load('train')
  want = features.extract_features(config, backbone, variables, train_ds, parallel.make_mesh(),
                                   normalize=False)
  store = [p for p in os.listdir(tmp_path / 'streamed' / 'features') if p.startswith('train')
           and p.endswith('.json')]
  assert len(store) == 1
  path = str(tmp_path / 'streamed' / 'features' / store[0][:-len('.json')])
  marker = json.load(open(path + '.json'))
  stored = feature_store.open_stored(path, marker['key'])
  assert stored.valid.sum() == 48 and not stored.valid.all()
  got = np.asarray(stored.features[stored.valid], np.float32)
  # Round to nearest: relative error <= 2^-11 of each float32 value (plus float32 noise).
  np.testing.assert_allclose(got, want, rtol=2.0**-11, atol=1e-6)
  np.testing.assert_array_equal(stored.labels[stored.valid], train_ds.labels)


def test_feature_cache_is_reused_only_with_the_same_key(tree, tmp_path, caplog):
  workdir = str(tmp_path / 'run')
  streamed = {'data.max_in_memory_gb': 0.0}
  first = knn.run_knn(_config(tree, tmp_path, **streamed), workdir)
  files_before = sorted(os.listdir(os.path.join(workdir, 'features')))
  assert not any('.tmp' in f for f in files_before)
  with caplog.at_level(logging.INFO):
    again = knn.run_knn(_config(tree, tmp_path, **streamed), workdir)
  assert again == first
  assert sum('Reusing the stored' in r.getMessage() for r in caplog.records) == 2
  assert sorted(os.listdir(os.path.join(workdir, 'features'))) == files_before
  caplog.clear()
  # Other weights (seed) or another image size: new files, never the old ones.
  for change in ({'seed': 1}, {'data.image_size': 20}):
    with caplog.at_level(logging.INFO):
      knn.run_knn(_config(tree, tmp_path, **streamed, **change), workdir)
    assert not any('Reusing' in r.getMessage() for r in caplog.records), change
    caplog.clear()
  # A marker whose key does not match (e.g. an edited or older file) is refused and rebuilt.
  config = _config(tree, tmp_path, **streamed)
  backbone, variables, _, _ = frozen.load_backbone(config, workdir)
  data = sources.from_config(config)
  source = data.open('train')
  key = feature_store.feature_key(config, data.spec, source, 'train',
                                  feature_store.variables_digest(variables))
  path = feature_store.feature_path(workdir, 'train', key)
  marker = json.load(open(path + '.json'))
  marker['key']['image_size'] = 99
  json.dump(marker, open(path + '.json', 'w'))
  assert feature_store.open_stored(path, key) is None
  # A data file without its marker (a killed write) is never trusted.
  os.remove(path + '.json')
  assert feature_store.open_stored(path, key) is None
  with caplog.at_level(logging.INFO):
    assert knn.run_knn(config, workdir) == first
  assert sum('Reusing the stored' in r.getMessage() for r in caplog.records) == 1  # eval only


def test_a_full_disk_is_one_message_and_leaves_no_file(tree, tmp_path):
  workdir = tmp_path / 'full'
  config = _config(tree, tmp_path, **{'data.max_in_memory_gb': 0.0})
  free = mock.Mock(free=100)
  with mock.patch.object(feature_store.shutil, 'disk_usage', return_value=free):
    with pytest.raises(errors.DataError, match='only 0.00 GiB are free there'):
      knn.run_knn(config, str(workdir))
  assert not [f for f in os.listdir(workdir / 'features') if not f.endswith('.labels.npz')]
  real_open = open

  def failing_open(path, *args, **kwargs):
    f = real_open(path, *args, **kwargs)
    if '.f16.tmp' in str(path):
      f.write = mock.Mock(side_effect=OSError(28, 'No space left on device'))
    return f

  with mock.patch('builtins.open', failing_open):
    with pytest.raises(errors.DataError, match='No space left on device.*free space'):
      knn.run_knn(config, str(workdir))
  assert not os.listdir(workdir / 'features')


def test_streamed_linear_probe_and_report(tree, tmp_path, caplog):
  """The probe reads the stored features; the report uses a fixed subset of a streamed split."""
  memory = linear_probe.run_linear_eval(_config(tree, tmp_path), str(tmp_path / 'memory'))
  config = _config(tree, tmp_path, **{'data.max_in_memory_gb': 0.0})
  workdir = str(tmp_path / 'streamed')
  streamed = linear_probe.run_linear_eval(config, workdir)
  assert streamed.keys() == memory.keys()
  assert abs(streamed['random_init_linear_top1'] - memory['random_init_linear_top1']) <= 100 / 16
  with caplog.at_level(logging.INFO):
    page = report.run_report(config, workdir)
  assert os.path.exists(page)
  assert any(r.getMessage().startswith('Report: the train split is streamed') and
             'subset of 49 of its 49 images' in r.getMessage() for r in caplog.records)
  assert results.read_results(workdir)['random_init_linear_top1'] == streamed[
      'random_init_linear_top1']


@pytest.mark.slow
def test_the_knn_monitor_runs_on_a_streamed_run(tree, tmp_path, caplog):
  config = _config(tree, tmp_path, **{'data.max_in_memory_gb': 0.0, 'num_train_steps': 2,
                                      'eval.knn_every_epochs': 0, 'eval.random_init': False,
                                      'data.stream_processes': 0, 'moco.queue_size': 32})
  workdir = tmp_path / 'train'
  with caplog.at_level(logging.INFO):
    pretrain.train_and_evaluate(config, str(workdir))
  assert any('kNN monitor: the train split is streamed' in r.getMessage()
             for r in caplog.records)
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert [r['step'] for r in rows if 'knn_top1' in r] == [2]
  assert 0.0 <= [r for r in rows if 'knn_top1' in r][0]['knn_top1'] <= 100.0


def _flip_byte(path, where):
  data = bytearray(open(path, 'rb').read())
  data[where % len(data)] ^= 0xFF
  open(path, 'wb').write(bytes(data))


def test_stored_features_are_verified_by_content(tree, tmp_path, caplog):
  """Issue 32, item 2: a byte changed anywhere in the features or the labels (same size, the
  marker intact) is seen on reuse, logged, and the features are extracted again."""
  workdir = str(tmp_path / 'run')
  config = _config(tree, tmp_path, **{'data.max_in_memory_gb': 0.0})
  first = knn.run_knn(config, workdir)
  backbone, variables, _, _ = frozen.load_backbone(config, workdir)
  data = sources.from_config(config)
  source = data.open('train')
  key = feature_store.feature_key(config, data.spec, source, 'train',
                                  feature_store.variables_digest(variables))
  path = feature_store.feature_path(workdir, 'train', key)
  assert feature_store.open_stored(path, key) is not None
  for suffix, where in (('.f16', 0), ('.f16', -1), ('.f16', 1001), ('.labels.npz', -30)):
    good = open(path + suffix, 'rb').read()
    _flip_byte(path + suffix, where)
    with caplog.at_level(logging.WARNING):
      assert feature_store.open_stored(path, key) is None, (suffix, where)
    assert 'do not match the checksums' in caplog.text
    caplog.clear()
    open(path + suffix, 'wb').write(good)
  _flip_byte(path + '.f16', 7)
  with caplog.at_level(logging.INFO):
    assert knn.run_knn(config, workdir) == first  # Extracted again, the same result.
  assert 'extracting again' in caplog.text
  assert feature_store.open_stored(path, key) is not None
