"""end_to_end and memory_bank checkpoints through every evaluation mode (issue 21).

One short pretraining run per method (a module fixture) leaves a workdir; each
mode then runs on it through main.py's own table (`main.MODES`, after
`cli.validate_for_mode`, which is what `python main.py --mode=...` does after
parsing its flags). Each test checks that the output is there and well formed,
and that it was computed from that run's query encoder, not from another one
(the random init, a head, the memory bank): every feature extraction a mode
makes is recorded and must have been given the trained backbone's variables,
and each number must equal the same computation redone here from the state
that training returned (not the checkpoint the mode restored).
"""

import copy
import json
import os
import pickle
import re
from typing import Any, NamedTuple

import jax
import numpy as np
from PIL import Image
import pytest

import helpers
import main
from moco_jax import cli
from moco_jax.core import parallel
from moco_jax.data import sources
from moco_jax.evaluation import features
from moco_jax.evaluation import frozen
from moco_jax.evaluation import knn
from moco_jax.evaluation import linear_paper
from moco_jax.evaluation import linear_paper_ops
from moco_jax.evaluation import linear_paper_store
from moco_jax.evaluation import linear_probe
from moco_jax.evaluation import report
from moco_jax.evaluation import results
from moco_jax import models
from moco_jax import pretrain
from moco_jax.weights import torchvision_names

pytestmark = pytest.mark.slow  # Two training runs and every evaluation mode (pytest.ini).
STEPS = 3
_EXTRACT = features.extract_features  # The real one, whatever a test patches in.


def _config(method):
  config = helpers.run_config(method, STEPS)
  # The smallest evaluations that still run every piece: 2 probe epochs, 1 paper epoch
  # of 4 steps, 64 t-SNE points (exact t-SNE, < 1 s).
  config.eval.batch_size = 128
  config.eval.linear_epochs = 2
  config.eval.linear_batch_size = 64
  config.eval.linear_step_epochs = (1,)
  config.eval.linear_lr = 1.0
  config.report.tsne_points = 64
  return config


class Run(NamedTuple):
  config: Any
  workdir: str
  state: Any  # The final TrainState, as train_and_evaluate returned it (host arrays).
  variables: dict  # Its query backbone: {'params', 'batch_stats'}.
  train_ds: Any
  eval_ds: Any


@pytest.fixture(scope='module', params=['end_to_end', 'memory_bank'])
def run(request, tmp_path_factory):
  """A STEPS-step run of the method in its own workdir (every mode of the module reads it)."""
  config = _config(request.param)
  workdir = str(tmp_path_factory.mktemp(request.param))
  state = jax.device_get(pretrain.train_and_evaluate(config, workdir))
  assert int(state.step) == STEPS
  variables = frozen.backbone_variables(state.params, state.batch_stats)
  # Trained: every BatchNorm running mean has moved off its init (0), so the random-init
  # encoder cannot pass for this one below.
  start = frozen.backbone_variables(*frozen.random_init_encoder(config))
  for got, init in zip(jax.tree.leaves(variables['batch_stats']),
                       jax.tree.leaves(start['batch_stats'])):
    assert np.abs(np.asarray(got) - np.asarray(init)).max() > 1e-6
  return Run(config, workdir, state, variables, sources.from_config(config).load('train'),
             sources.from_config(config).load('eval'))


@pytest.fixture
def extracted(monkeypatch):
  """The backbone variables of every `features.extract_features` call, in order."""
  seen = []

  def spy(config, backbone, variables, ds, mesh, normalize=True):
    seen.append(jax.device_get(variables))
    return _EXTRACT(config, backbone, variables, ds, mesh, normalize)

  monkeypatch.setattr(features, 'extract_features', spy)
  return seen


def _mode(config, mode, workdir):
  """`python main.py --mode=MODE --workdir=WORKDIR` after flag parsing: check, then run."""
  cli.validate_for_mode(config, mode, workdir)
  main.MODES[mode](config, workdir)
  return results.read_results(workdir)


def _assert_same_tree(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _features(run, ds, normalize=True):
  backbone = models.create_backbone(run.config.model)
  return _EXTRACT(run.config, backbone, run.variables, ds, parallel.make_mesh(), normalize)


def _knn_top1(run):
  return knn.knn_top1(_features(run, run.train_ds), run.train_ds.labels,
                      _features(run, run.eval_ds), run.eval_ds.labels,
                      run.train_ds.num_classes, k=run.config.eval.knn_k,
                      temperature=run.config.eval.knn_temperature)


def test_knn_votes_with_the_checkpoint_s_features(run, extracted):
  saved = _mode(run.config, 'knn', run.workdir)
  assert saved['knn_step'] == STEPS
  assert len(extracted) == 2  # The train split, then the eval split.
  for variables in extracted:
    _assert_same_tree(variables, run.variables)
  assert saved['knn_top1'] == _knn_top1(run)


def test_linear_eval_probes_the_checkpoint_s_features(run, extracted):
  saved = _mode(run.config, 'linear_eval', run.workdir)
  assert saved['linear_step'] == STEPS
  assert len(extracted) == 2
  for variables in extracted:
    _assert_same_tree(variables, run.variables)
  want = linear_probe.linear_probe(
      _features(run, run.train_ds, normalize=False), run.train_ds.labels,
      _features(run, run.eval_ds, normalize=False), run.eval_ds.labels,
      run.train_ds.num_classes, run.config.eval, seed=run.config.seed)
  assert want['lr'] in run.config.eval.linear_lrs
  assert (saved['linear_top1'], saved['linear_top5'], saved['linear_lr']) == (
      want['top1'], want['top5'], want['lr'])


def test_linear_eval_paper_protocol_trains_on_the_checkpoint_s_backbone(run, extracted,
                                                                       monkeypatch):
  config = copy.deepcopy(run.config)
  config.eval.linear_protocol = 'paper'
  config.eval.linear_epochs = 1
  trained_on = []
  real = linear_paper.train_paper_classifier

  def spy(config, backbone, variables, *args, **kwargs):
    trained_on.append(jax.device_get(variables))
    return real(config, backbone, variables, *args, **kwargs)

  monkeypatch.setattr(linear_paper, 'train_paper_classifier', spy)
  saved = _mode(config, 'linear_eval', run.workdir)
  assert saved['linear_paper_step'] == STEPS and saved['linear_paper_epochs'] == 1
  assert saved['linear_paper_lr'] == config.eval.linear_lr * 64 / 256
  # The classifier trained on the checkpoint's backbone (its views are encoded inside the
  # step) and was scored on the checkpoint's val features.
  assert len(trained_on) == 1 and len(extracted) == 1
  _assert_same_tree(trained_on[0], run.variables)
  _assert_same_tree(extracted[0], run.variables)
  directory = linear_paper_store.result_dir(run.workdir, '')
  rows = linear_paper_store.read_curve(directory)
  assert [r['epoch'] for r in rows] == [1] and rows[0]['step'] == len(run.train_ds) // 64
  assert rows[0]['val_top1'] == saved['linear_paper_top1']
  # Its saved classifier, scored here on val features of the trained state, gives eval.json.
  val_ds = linear_paper_ops.center_crop_split(run.eval_ds, config.eval.linear_center_crop)
  val_features = _features(run, val_ds, normalize=False)
  template = linear_paper.initial_state(config.seed, val_features.shape[1],
                                        run.train_ds.num_classes, STEPS)
  manager = linear_paper_store.manager(directory)
  try:
    classifier = linear_paper_store.restore(manager, template)
  finally:
    manager.close()
  assert int(classifier['step']) == rows[0]['step']
  assert linear_paper.val_accuracy(classifier['params'], val_features, run.eval_ds.labels) == (
      saved['linear_paper_top1'], saved['linear_paper_top5'])


def test_export_writes_the_checkpoint_s_backbone_in_both_formats(run):
  backbone = jax.tree.map(np.asarray, (run.state.params['backbone'],
                                       run.state.batch_stats['backbone']))
  config = copy.deepcopy(run.config)
  saved = _mode(config, 'export', run.workdir)
  assert saved['export_step'] == STEPS
  with np.load(os.path.join(run.workdir, 'backbone_torchvision.npz')) as f:
    state = dict(f)
  # Written out by hand for the first layer: HWIO -> OIHW, BatchNorm by name.
  np.testing.assert_array_equal(state['conv1.weight'],
                                backbone[0]['conv1']['kernel'].transpose(3, 2, 0, 1))
  np.testing.assert_array_equal(state['bn1.running_mean'], backbone[1]['bn1']['mean'])
  np.testing.assert_array_equal(state['bn1.weight'], backbone[0]['bn1']['scale'])
  assert not any(k.startswith(('fc', 'head', 'bank')) for k in state)
  # All of it: read back into Flax trees, it is the trained backbone, leaf for leaf.
  _assert_same_tree(torchvision_names.backbone_from_torchvision(state, *backbone), backbone)
  with open(os.path.join(run.workdir, 'backbone_torchvision.json')) as f:
    sidecar = json.load(f)
  assert sidecar['model'] == json.loads(json.dumps(config.model.to_dict())) and 'torchvision' in sidecar['format']

  config.export.format = 'detectron2'
  assert _mode(config, 'export', run.workdir)['export_step'] == STEPS
  with open(os.path.join(run.workdir, 'backbone_detectron2.pkl'), 'rb') as f:
    checkpoint = pickle.load(f)
  assert checkpoint['__author__'] == 'MOCO' and checkpoint['matching_heuristics'] is True
  model = checkpoint['model']
  assert set(model) == {torchvision_names.detectron2_name(k) for k in state}
  np.testing.assert_array_equal(model['stem.conv1.weight'], state['conv1.weight'])
  np.testing.assert_array_equal(model['stem.conv1.norm.running_var'], backbone[1]['bn1']['var'])
  for key, value in state.items():
    np.testing.assert_array_equal(model[torchvision_names.detectron2_name(key)], value, err_msg=key)


def _png_is_drawn(path):
  with Image.open(path) as image:
    pixels = np.asarray(image.convert('RGB'), np.float32)
  return pixels.std() > 10


def test_report_draws_the_checkpoint(run, extracted):
  _mode(run.config, 'report', run.workdir)
  page = os.path.join(run.workdir, report.REPORT_DIR, 'index.html')
  with open(page) as f:
    text = f.read()
  for name in report.PICTURES:
    assert f'src="{name}"' in text and _png_is_drawn(os.path.join(os.path.dirname(page), name))
  assert 'Not drawn' not in text
  # Train and eval features of the checkpoint, then the random-init floor's eval features.
  assert len(extracted) == 3
  _assert_same_tree(extracted[0], run.variables)
  _assert_same_tree(extracted[1], run.variables)
  _assert_same_tree(extracted[2], frozen.backbone_variables(
      *frozen.random_init_encoder(run.config)))
  facts = dict(re.findall(r'<tr><th>([^<]*)</th><td>([^<]*)</td></tr>', text))
  assert facts['checkpoint step'] == str(STEPS)
  assert float(facts['kNN top-1 (%) now']) == round(_knn_top1(run), 2)
  assert f'&quot;method&quot;: &quot;{run.config.method}&quot;' in text  # The run's config.json.
