"""Linear probe: the classifier, and evaluation of a real checkpoint directory."""

import json
import os

import jax
import numpy as np
import pytest

from moco_jax.evaluation import classifier
import helpers
from moco_jax.evaluation import frozen
from moco_jax.evaluation import knn
from moco_jax.evaluation import linear_probe


def _config(**eval_overrides):
  config = helpers.tiny_config(data__synthetic_examples=48, eval__batch_size=48,
                               eval__linear_epochs=3, eval__linear_batch_size=16)
  return helpers.override(config, **{f'eval__{k}': v for k, v in eval_overrides.items()})


_write_checkpoint = helpers.write_checkpoint


@pytest.fixture(scope='module')
def checkpoint_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('pretrained'))
  _write_checkpoint(_config(), workdir, step=7)
  return workdir


def test_topk_accuracy():
  logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
  labels = np.array([1, 2, 0])
  assert classifier.topk_accuracy(logits, labels, 1) == pytest.approx(100 / 3)
  assert classifier.topk_accuracy(logits, labels, 2) == pytest.approx(200 / 3)
  assert classifier.topk_accuracy(logits, labels, 5) == 100.0  # k clipped to the classes.


def test_learning_rate_schedule_scales_with_batch_and_steps_down():
  config = _config(linear_lr=30.0, linear_batch_size=512, linear_epochs=10,
                   linear_step_epochs=(6, 8))
  lr = linear_probe.linear_learning_rate_fn(config.eval, steps_per_epoch=5)
  assert float(lr(0)) == pytest.approx(60.0)
  assert float(lr(29)) == pytest.approx(60.0)
  assert float(lr(30)) == pytest.approx(6.0)
  assert float(lr(40)) == pytest.approx(0.6)
  with pytest.raises(ValueError, match='linear_schedule'):
    linear_probe.linear_learning_rate_fn(_config(linear_schedule='poly').eval, 5)


def test_probe_separates_linearly_separable_features():
  rng = np.random.default_rng(0)
  centres = 3.0 * rng.normal(size=(4, 16))
  train_labels = rng.integers(0, 4, size=400)
  eval_labels = rng.integers(0, 4, size=100)
  train_features = (centres[train_labels] + rng.normal(size=(400, 16))).astype(np.float32)
  eval_features = (centres[eval_labels] + rng.normal(size=(100, 16))).astype(np.float32)
  for protocol in ('raw', 'standardized'):
    config = _config(linear_epochs=20, linear_lr=1.0, linear_batch_size=32,
                     linear_step_epochs=(12, 16), linear_protocol=protocol)
    scores = linear_probe.linear_probe(train_features, train_labels, eval_features, eval_labels,
                                      4, config.eval)
    assert scores['top1'] >= 98.0 and scores['top5'] == 100.0
    assert scores['diverged'] == ''
    assert scores['lr'] in ((1.0,) if protocol == 'raw' else config.eval.linear_lrs)


def test_classifier_init_is_the_paper_s():
  params = classifier.init_classifier(jax.random.PRNGKey(0), 512, 1000)
  assert abs(float(np.std(params['kernel'])) - 0.01) < 1e-3
  assert not np.any(params['bias'])


def test_linear_eval_of_a_checkpoint_dir_writes_eval_json_with_the_step(checkpoint_dir):
  with open(os.path.join(checkpoint_dir, 'eval.json'), 'w') as f:
    json.dump({'knn_top1': 12.5, 'knn_step': 7}, f)  # Must survive the merge.
  results = linear_probe.run_linear_eval(_config(), checkpoint_dir)
  assert results['linear_step'] == 7
  assert 0.0 <= results['linear_top1'] <= results['linear_top5'] <= 100.0
  config = _config(random_init=True)
  floor = linear_probe.run_linear_eval(config, checkpoint_dir)
  assert floor['random_init_linear_step'] == 0
  with open(os.path.join(checkpoint_dir, 'eval.json')) as f:
    saved = json.load(f)
  assert saved['knn_top1'] == 12.5 and saved['linear_step'] == 7
  assert {'linear_top1', 'linear_top5', 'linear_lr', 'random_init_linear_top1',
          'random_init_linear_top5'} <= set(saved)
  # The paper's raw protocol writes its own keys beside the default's.
  raw = linear_probe.run_linear_eval(_config(linear_protocol='raw', linear_lr=0.1),
                                     checkpoint_dir)
  assert set(raw) == {'linear_raw_top1', 'linear_raw_top5', 'linear_raw_lr', 'linear_raw_step'}
  with open(os.path.join(checkpoint_dir, 'eval.json')) as f:
    saved_after = json.load(f)
  assert saved_after['linear_top1'] == saved['linear_top1']


def test_restored_backbone_is_the_checkpoint_s(checkpoint_dir):
  config = _config()
  _, variables, step, prefix = frozen.load_backbone(config, checkpoint_dir)
  params, batch_stats = frozen.random_init_encoder(config)  # What the checkpoint holds.
  assert step == 7 and prefix == ''
  for got, want in zip(jax.tree.leaves(variables['params']),
                       jax.tree.leaves(params['backbone'])):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_no_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'No checkpoint to evaluate in .*checkpoints'):
    linear_probe.run_linear_eval(_config(), str(tmp_path))
  os.makedirs(os.path.join(tmp_path, 'checkpoints', 'not_a_step'))
  with pytest.raises(FileNotFoundError, match='found: not_a_step'):
    knn.run_knn(_config(), str(tmp_path))


def test_wrong_architecture_names_both(checkpoint_dir):
  config = _config()
  config.model.width = 16
  with pytest.raises(ValueError, match=r'holds a resnet_tiny .*width 8, 64 features.*config '
                     r'asks for resnet_tiny .*width 16, 128 features'):
    linear_probe.run_linear_eval(config, checkpoint_dir)
  config = _config()
  config.model.name = 'resnet18'
  with pytest.raises(ValueError, match=r'asks for resnet18 \(stages \[2, 2, 2, 2\]'):
    knn.run_knn(config, checkpoint_dir)


def test_lr_sweep_picks_on_held_out_train_images_and_skips_diverged_lrs():
  rng = np.random.default_rng(1)
  centres = 2.0 * rng.normal(size=(3, 8))
  labels = rng.integers(0, 3, size=300)
  feats = (centres[labels] + rng.normal(size=(300, 8))).astype(np.float32)
  config = _config(linear_epochs=10, linear_batch_size=30, linear_step_epochs=(6, 8),
                   linear_lrs=(1e-5, 0.1, float('inf')))
  lr, scores = linear_probe.select_lr(feats, labels, 3, config.eval)
  assert lr == 0.1 and np.isnan(scores[float('inf')]) and scores[0.1] > scores[1e-5]
  fit, held = linear_probe.holdout_split(300, 0.1, seed=0)
  assert len(held) == 30 and len(fit) == 270 and not set(fit) & set(held)


def test_divergence_is_named():
  assert linear_probe.divergence(np.array([2.0, 1.0, 0.5]), 10) == ''
  assert 'nan' in linear_probe.divergence(np.array([2.0, np.nan]), 10)
  assert 'above log(10)' in linear_probe.divergence(np.array([40.0, 3.1]), 10)
  assert 'rose' in linear_probe.divergence(np.array([1.0, 0.5, 1.5]), 10)
