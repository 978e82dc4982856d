"""kNN monitor: the weighted vote, sharded feature extraction, and the pretraining hook."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from configs import tiny
from moco_jax.augmentation import augment
from moco_jax.core import parallel
from moco_jax.data import sources
from moco_jax.evaluation import features
from moco_jax.evaluation import frozen
from moco_jax.evaluation import knn
from moco_jax.evaluation import results
from moco_jax import models
from moco_jax import pretrain
from moco_jax.training import optim
from moco_jax.training import step as step_lib


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference_scores(train_features, train_labels, queries, num_classes, k, t):
  """The official demo's kNN, one query at a time, in float64."""
  scores = np.zeros((len(queries), num_classes))
  for i, q in enumerate(queries.astype(np.float64)):
    sim = train_features.astype(np.float64) @ q
    top = np.argsort(-sim)[:k]
    for j in top:
      scores[i, train_labels[j]] += np.exp(sim[j] / t)
  return scores


def test_knn_scores_equal_a_slow_numpy_reference():
  rng = np.random.default_rng(0)
  bank = _unit(rng.normal(size=(300, 16))).astype(np.float32)
  labels = rng.integers(0, 7, size=300).astype(np.int32)
  queries = _unit(rng.normal(size=(37, 16))).astype(np.float32)  # Not a multiple of chunk.
  got = knn.knn_scores(bank, labels, queries, num_classes=7, k=20, temperature=0.1, chunk=16)
  want = _reference_scores(bank, labels, queries, 7, 20, 0.1)
  np.testing.assert_allclose(got, want, rtol=1e-4)
  # k larger than the bank is clipped, not an error: every train point votes.
  got_all = knn.knn_scores(bank, labels, queries, num_classes=7, k=1000, temperature=0.5)
  np.testing.assert_allclose(got_all, _reference_scores(bank, labels, queries, 7, 300, 0.5),
                             rtol=1e-4)


def test_knn_on_well_separated_clusters_is_perfect():
  rng = np.random.default_rng(1)
  centres = _unit(rng.normal(size=(5, 32)))
  train_labels = np.repeat(np.arange(5), 40).astype(np.int32)
  eval_labels = np.tile(np.arange(5), 20).astype(np.int32)
  train_features = _unit(centres[train_labels] + 0.05 * rng.normal(size=(200, 32)))
  eval_features = _unit(centres[eval_labels] + 0.05 * rng.normal(size=(100, 32)))
  assert knn.knn_top1(train_features, train_labels, eval_features, eval_labels, 5,
                      k=200, temperature=0.1) == 100.0


def test_bad_knn_settings_name_the_field():
  bank = np.ones((4, 2), np.float32)
  with pytest.raises(ValueError, match='knn_temperature'):
    knn.knn_scores(bank, np.zeros(4, np.int32), bank, 2, k=2, temperature=0.0)
  with pytest.raises(ValueError, match='knn_k'):
    knn.knn_scores(bank, np.zeros(4, np.int32), bank, 2, k=0, temperature=0.1)


def test_monitor_steps():
  assert knn.monitor_steps(-1, 10, 100) == set()
  assert knn.monitor_steps(0, 10, 100) == {100}
  assert knn.monitor_steps(3, 10, 100) == {30, 60, 90, 100}
  assert knn.monitor_steps(0.5, 10, 20) == {5, 10, 15, 20}


def test_sharded_extraction_with_a_padded_last_batch_equals_a_plain_forward():
  config = tiny.get_config()
  config.eval.batch_size = 12  # Rounded up to 16 on 8 devices; 40 images = 2.5 batches.
  ds = sources.from_config(config).load('train')
  ds = sources.ImageDataset(ds.images[:40], ds.labels[:40], ds.num_classes,
                                   ds.class_names)
  backbone = models.create_backbone(config.model)
  params, batch_stats = frozen.random_init_encoder(config)
  variables = frozen.backbone_variables(params, batch_stats)
  got = features.extract_features(config, backbone, variables, ds, parallel.make_mesh())
  x = augment.eval_view(jnp.asarray(ds.images), config.data.image_size, config.aug)
  want = np.array(backbone.apply(variables, x, train=False))
  want /= np.linalg.norm(want, axis=1, keepdims=True)
  assert got.shape == (40, backbone.num_features)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


_read_jsonl = helpers.read_jsonl


@pytest.mark.slow
def test_monitor_writes_knn_top1_during_pretraining_and_mode_knn_writes_eval_json(tmp_path):
  config = tiny.get_config()
  config.data.synthetic_examples = 128  # 2 steps per epoch at batch 64.
  config.num_epochs = 3
  config.eval.knn_every_epochs = 2  # Epoch 2 (step 4) and the end (step 6).
  config.eval.batch_size = 64
  config.log_every_steps = 2
  config.checkpoint_every_steps = 6
  workdir = str(tmp_path)
  pretrain.train_and_evaluate(config, workdir)
  rows = [r for r in _read_jsonl(os.path.join(workdir, 'metrics.jsonl')) if 'knn_top1' in r]
  assert [r['step'] for r in rows] == [4, 6]
  assert all(0.0 <= r['knn_top1'] <= 100.0 for r in rows)
  assert rows[0]['epoch'] == 2.0

  # --mode=knn on the same checkpoint reproduces the final monitor value.
  scores = knn.run_knn(config, workdir)
  assert scores == {'knn_top1': pytest.approx(rows[-1]['knn_top1']), 'knn_step': 6}
  config.eval.random_init = True
  knn.run_knn(config, workdir)
  saved = results.read_results(workdir)
  assert saved['knn_step'] == 6 and saved['random_init_knn_step'] == 0
  assert set(saved) == {'knn_top1', 'knn_step', 'random_init_knn_top1', 'random_init_knn_step'}


def test_random_init_floor_is_the_encoder_pretraining_starts_from():
  config = tiny.get_config()
  params, batch_stats = frozen.random_init_encoder(config)
  lr = optim.create_learning_rate_fn(config, 4, 8)
  setup = step_lib.make_step_setup(config, 1, optim.create_optimizer(config, lr))
  start = step_lib.init_state(config, setup, parallel.make_mesh(jax.devices()[:1]))
  # Same random draws; two compiled programs (this one alone, init_state's with the optimiser and
  # the method's state) may fuse and round differently.
  for got, want in ((params, start.params), (batch_stats, start.batch_stats)):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
