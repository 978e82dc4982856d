"""The paper's linear protocol (eval.linear_protocol=paper): schedule, step, freezing, resume."""

import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from moco_jax import models
from moco_jax.core import errors
from moco_jax.core import parallel
from moco_jax.data import sources
from moco_jax.evaluation import features
from moco_jax.evaluation import frozen
from moco_jax.evaluation import linear_paper
from moco_jax.evaluation import linear_paper_ops
from moco_jax.evaluation import linear_paper_store
from moco_jax.evaluation import linear_probe
from moco_jax.run import stopping

EPS32 = float(np.finfo(np.float32).eps)


def _config(**eval_overrides):
  config = helpers.tiny_config(
      data__image_size=16, data__synthetic_examples=48, data__synthetic_classes=4,
      eval__batch_size=48, eval__linear_protocol='paper', eval__linear_epochs=3,
      eval__linear_batch_size=16, eval__linear_lr=0.5, eval__linear_step_epochs=(1, 2))
  return helpers.override(config, **{f'eval__{k}': v for k, v in eval_overrides.items()})


@pytest.fixture(scope='module')
def setup():
  """A tiny random-init backbone, the synthetic splits and their val features."""
  config = _config()
  backbone = models.create_backbone(config.model)
  params, batch_stats = frozen.random_init_encoder(config)
  variables = jax.device_get(frozen.backbone_variables(params, batch_stats))
  train_ds = sources.from_config(config).load('train')
  eval_ds = sources.from_config(config).load('eval')
  mesh = parallel.make_mesh()
  val_ds = linear_paper_ops.center_crop_split(eval_ds, config.eval.linear_center_crop)
  val_features = features.extract_features(config, backbone, variables, val_ds, mesh,
                                           normalize=False)
  return config, backbone, variables, train_ds, eval_ds, val_features


def test_lr_schedule_is_the_official_adjust_learning_rate():
  config = _config(linear_lr=30.0, linear_step_epochs=(60, 80))
  lr0 = linear_paper_ops.base_lr(config.eval, 512)
  assert lr0 == 60.0  # 30 x 512 / 256.
  for epoch in range(100):
    drops = (epoch >= 60) + (epoch >= 80)
    assert linear_paper_ops.epoch_lr(lr0, epoch, (60, 80)) == pytest.approx(60.0 * 0.1**drops,
                                                                        rel=1e-12)
  assert linear_paper_ops.epoch_lr(30.0, 59, (60, 80)) == 30.0
  assert linear_paper_ops.epoch_lr(30.0, 60, (60, 80)) == pytest.approx(3.0)
  assert linear_paper_ops.epoch_lr(30.0, 80, (60, 80)) == pytest.approx(0.3)


def _step_inputs(config, train_ds, step, mesh):
  batch = config.eval.linear_batch_size
  idx = linear_paper.batching.train_indices(len(train_ds), batch, config.seed, step)
  return idx, (parallel.shard_batch(train_ds.images[idx], mesh),
               parallel.shard_batch(train_ds.labels[idx], mesh),
               parallel.shard_batch(idx.astype(np.int32), mesh))


def _views_features(config, backbone, variables, images, indices, epoch, train):
  norm = linear_paper_ops.Norm(tuple(config.aug.mean), tuple(config.aug.std))
  views = jax.vmap(lambda i, im: linear_paper_ops.train_view(
      linear_paper_ops.view_key(config.seed, epoch, i), im, config.data.image_size,
      tuple(config.eval.linear_crop_scale), tuple(config.aug.crop_ratio), norm))(
          jnp.asarray(indices), jnp.asarray(images))
  if train:  # Training mode: BN normalises by the batch's statistics and updates its own.
    out, _ = backbone.apply(variables, views, train=True, mutable=['batch_stats'])
    return np.asarray(out, np.float64)
  return np.asarray(backbone.apply(variables, views, train=False), np.float64)


def _reference_sgd(x, labels, w, b, buf_w, buf_b, lr, num_classes, momentum=0.9):
  """Softmax cross-entropy gradient example by example in float64, torch's momentum."""
  gw, gb = np.zeros_like(w), np.zeros_like(b)
  for xi, yi in zip(x, labels):
    z = xi @ w + b
    p = np.exp(z - z.max())
    p /= p.sum()
    p[yi] -= 1.0
    gw += np.outer(xi, p) / len(x)
    gb += p / len(x)
  buf_w, buf_b = momentum * buf_w + gw, momentum * buf_b + gb
  return w - lr * buf_w, b - lr * buf_b, buf_w, buf_b


def _bound(x, w, lr_sum, batch):
  """Float32 error bound on the weights after steps summing to lr_sum: each gradient entry
  sums `batch` terms |x_i| |p_i - y_i| <= |x_i| (2 at most) with relative error <= (batch + D +
  C + 8) eps (the sum, the logits' dot over D features, the softmax's sum over C classes and a
  few roundings), and the features themselves carry a relative error of the same order."""
  d, c = w.shape
  scale = 2.0 * np.abs(x).sum(axis=0)[:, None] / batch + 2.0  # |grad terms| per input row.
  bound = lr_sum * (batch + d + c + 8) * EPS32 * scale + 4 * EPS32 * np.abs(w).max()
  return np.broadcast_to(bound, w.shape)


def test_two_steps_match_a_numpy_reference_and_use_inference_mode(setup):
  config, backbone, variables, train_ds, _, val_features = setup
  mesh = parallel.make_mesh()
  num_classes = 4
  step_fn = linear_paper.make_train_step(
      backbone, mesh, config.data.image_size, tuple(config.eval.linear_crop_scale),
      tuple(config.aug.crop_ratio),
      linear_paper_ops.Norm(tuple(config.aug.mean), tuple(config.aug.std)),
      config.model.dtype, 0.0, config.seed)
  state = linear_paper.initial_state(config.seed, val_features.shape[1], num_classes, 0)
  cls, buf = state['params'], state['momentum']
  w, b = np.asarray(cls['kernel'], np.float64), np.asarray(cls['bias'], np.float64)
  bw, bb = np.zeros_like(w), np.zeros_like(b)
  lr = 0.5
  stats_before = jax.tree.map(np.copy, variables['batch_stats'])
  for step in range(2):
    idx, (images, labels, indices) = _step_inputs(config, train_ds, step, mesh)
    cls, buf, loss, _ = step_fn(cls, buf, variables, images, labels, indices, jnp.int32(0),
                                jnp.float32(lr))
    x = _views_features(config, backbone, variables, train_ds.images[idx], idx, 0, train=False)
    if step == 0:
      z = x @ w + b
      ref_loss = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(idx)), train_ds.labels[idx]])
      assert float(loss) == pytest.approx(ref_loss, rel=1e-5)
      # Training-mode BN (the batch's statistics) would give another loss: the check bites.
      xt = _views_features(config, backbone, variables, train_ds.images[idx], idx, 0, True)
      zt = xt @ w + b
      loss_t = np.mean(np.log(np.exp(zt).sum(1)) - zt[np.arange(len(idx)),
                                                      train_ds.labels[idx]])
      assert abs(loss_t - ref_loss) > 1e-3
    w, b, bw, bb = _reference_sgd(x, train_ds.labels[idx], w, b, bw, bb, lr, num_classes)
  tol = _bound(x, w, lr * (1 + 1.9), len(idx))
  np.testing.assert_array_less(np.abs(np.asarray(cls['kernel']) - w), tol)
  np.testing.assert_allclose(np.asarray(cls['bias']), b, atol=float(tol.max()))
  # The backbone is an input only: its BN running statistics are what they were.
  jax.tree.map(np.testing.assert_array_equal, variables['batch_stats'], stats_before)


def _train(setup, directory, mesh=None, **kw):
  config, backbone, variables, train_ds, eval_ds, val_features = setup
  return linear_paper.train_paper_classifier(
      config, backbone, variables, train_ds, val_features, eval_ds.labels, 4,
      mesh or parallel.make_mesh(), directory, **kw)


def test_resume_after_kill_and_after_sigterm_is_bit_identical(setup, tmp_path, monkeypatch):
  whole = _train(setup, str(tmp_path / 'whole'))
  assert whole['done'] and whole['step'] == 9 and len(whole['rows']) == 3
  assert [r['lr'] for r in whole['rows']] == pytest.approx([0.5 / 16, 0.05 / 16, 0.005 / 16])
  # A kill after step 5 (mid epoch 2): nothing after the epoch-1 checkpoint survives.
  killed = str(tmp_path / 'killed')
  _train(setup, killed, max_steps=5)
  resumed = _train(setup, killed)
  # SIGTERM at step 4 (mid epoch 2): saved there, with the epoch's running sums.
  stopped = str(tmp_path / 'stopped')
  real = stopping.StopWatcher.requested

  def sigterm_at_4(self, manager, step):
    if step == 4:  # A real SIGTERM, through the watcher's handler.
      os.kill(os.getpid(), signal.SIGTERM)
    return real(self, manager, step)

  monkeypatch.setattr(stopping.StopWatcher, 'requested', sigterm_at_4)
  with pytest.raises(stopping.Interrupted) as stop:
    _train(setup, stopped)
  assert stop.value.step == 4 and stop.value.exit_code == stopping.EXIT_PREEMPTED
  monkeypatch.setattr(stopping.StopWatcher, 'requested', real)
  after_stop = _train(setup, stopped)
  for other in (resumed, after_stop):
    jax.tree.map(np.testing.assert_array_equal, other['params'], whole['params'])
    assert other['rows'] == whole['rows']
  assert linear_paper_store.read_curve(stopped) == whole['rows']
  assert os.path.exists(os.path.join(stopped, 'curves.png'))


def test_one_and_eight_devices_agree(setup, tmp_path):
  if jax.device_count() < 8:
    pytest.skip('needs XLA_FLAGS=--xla_force_host_platform_device_count=8')
  config, backbone, variables, train_ds, _, _ = setup
  one = _train(setup, str(tmp_path / 'one'), mesh=parallel.make_mesh(jax.devices()[:1]))
  eight = _train(setup, str(tmp_path / 'eight'), mesh=parallel.make_mesh(jax.devices()[:8]))
  # Only the order of the gradient's sum over the batch (and the backbone's batch
  # size) differs; the bound covers the whole run's summed lrs.
  idx = np.arange(len(train_ds))
  x = _views_features(config, backbone, variables, train_ds.images, idx, 0, train=False)
  lr_sum = sum(r['lr'] for r in one['rows']) * 3 / (1 - 0.9)  # 3 steps an epoch; momentum.
  tol = _bound(x, np.asarray(one['params']['kernel']), lr_sum, 16)
  np.testing.assert_array_less(np.abs(one['params']['kernel'] - eight['params']['kernel']), tol)


def test_linear_eval_paper_writes_its_keys_and_curve(tmp_path):
  workdir = str(tmp_path)
  with open(os.path.join(workdir, 'eval.json'), 'w') as f:
    json.dump({'linear_top1': 1.5}, f)  # Another protocol's result survives.
  found = linear_probe.run_linear_eval(_config(random_init=True), workdir)
  assert set(found) == {'random_init_linear_paper_' + k
                        for k in ('top1', 'top5', 'epochs', 'lr', 'step')}
  assert 0.0 <= found['random_init_linear_paper_top1'] <= found['random_init_linear_paper_top5']
  with open(os.path.join(workdir, 'eval.json')) as f:
    saved = json.load(f)
  assert saved['linear_top1'] == 1.5 and saved['random_init_linear_paper_epochs'] == 3
  rows = linear_paper_store.read_curve(os.path.join(workdir, 'random_init_linear_paper'))
  assert [r['epoch'] for r in rows] == [1, 2, 3]
  assert rows[-1]['val_top1'] == found['random_init_linear_paper_top1']


def test_streamed_split_is_cropped_on_the_host_and_resumes_exactly(tmp_path):
  root = helpers.image_tree(tmp_path / 'folder', {'train': 6}, classes=3, size=(40, 30))
  shutil.copytree(root / 'train', root / 'val')
  config = _config(linear_batch_size=8, linear_epochs=2, linear_step_epochs=(1,))
  config.model.stem = 'cifar'
  config.data.update(dict(source='folder', path=str(root), cache_dir=str(tmp_path / 'cache'),
                          max_in_memory_gb=1e-6, stream_processes=0, num_workers=2))
  plan = linear_paper.streaming.plan(sources.from_config(config))
  assert plan.stream
  backbone = models.create_backbone(config.model)
  params, batch_stats = frozen.random_init_encoder(config)
  variables = jax.device_get(frozen.backbone_variables(params, batch_stats))
  eval_ds = sources.from_config(config).load('eval')
  mesh = parallel.make_mesh()
  val_features = features.extract_features(
      config, backbone, variables, linear_paper_ops.center_crop_split(eval_ds, 0.875), mesh, False)

  def run(directory, **kw):
    return linear_paper.train_paper_classifier(config, backbone, variables, plan.reader,
                                               val_features, eval_ds.labels, 3, mesh,
                                               str(tmp_path / directory), **kw)

  whole = run('whole')
  assert whole['done'] and whole['step'] == 4  # 18 images: 2 steps of 8 an epoch.
  run('killed', max_steps=3)
  resumed = run('killed')
  jax.tree.map(np.testing.assert_array_equal, resumed['params'], whole['params'])
  assert resumed['rows'] == whole['rows']
  # The host cuts one image_size crop per example (the device only flips and normalises).
  batch = next(linear_paper.local_batches(config, plan.reader, 8, 0, 1))
  assert batch['image'].shape == (8, 16, 16, 3) and batch['index'].dtype == np.int32


@pytest.mark.parametrize('field, value', [('linear_protocol', 'papr'),
                                          ('linear_crop_scale', (0.5, 0.1)),
                                          ('linear_center_crop', 1.5),
                                          ('linear_schedule', 'cosine')])
def test_bad_paper_config_is_one_clear_error(field, value):
  from moco_jax import config_checks  # pylint: disable=g-import-not-at-top
  config = _config()
  config.eval[field] = value
  with pytest.raises(config_checks.ConfigError, match=f'config.eval.{field}='):
    config_checks.validate(config, num_devices=1)
  config_checks.validate(_config(), num_devices=1)  # The defaults pass.


# What is resumed matches what is asked (issue 32, item 3): every field that defines the result.
_CHANGES = {'linear_epochs': 4, 'linear_batch_size': 8, 'linear_lr': 0.25,
            'linear_step_epochs': (2, 3), 'linear_weight_decay': 1e-4,
            'linear_crop_scale': (0.5, 1.0), 'linear_center_crop': 0.75}


def test_a_resume_with_any_protocol_field_changed_is_refused(setup, tmp_path):
  """A cut-short protocol, rerun with each defining field changed (and with other weights):
  refused naming the field, the directory left as it was; rerun as before: it resumes."""
  import hashlib  # pylint: disable=g-import-not-at-top
  config, backbone, variables, train_ds, _, val_features = setup
  directory = str(tmp_path / 'cut')
  _train(setup, directory, max_steps=4)  # Saved at the end of epoch 1 (step 3).

  def digest():
    out = {}
    for root, _, names in os.walk(directory):
      for name in names:
        with open(os.path.join(root, name), 'rb') as f:
          out[os.path.join(root, name)] = hashlib.sha256(f.read()).hexdigest()
    return out
  before = digest()
  mesh = parallel.make_mesh()
  labels = np.asarray(setup[4].labels)
  changed = {**{f'eval.{k}': v for k, v in _CHANGES.items()}, 'seed': 5}
  for field, value in changed.items():
    other = _config()
    section, _, name = field.rpartition('.')
    (other[section] if section else other)[name] = value
    with pytest.raises(errors.CheckpointError, match=name):
      linear_paper.train_paper_classifier(other, backbone, variables, train_ds, val_features,
                                          labels, 4, mesh, directory)
    assert digest() == before, field
  other_weights = jax.tree.map(lambda x: x + 1, variables)
  with pytest.raises(errors.CheckpointError, match='backbone_sha256'):
    linear_paper.train_paper_classifier(config, backbone, other_weights, train_ds, val_features,
                                        labels, 4, mesh, directory)
  assert digest() == before
  done = _train(setup, directory)
  assert done['done'] and done['step'] == 9


def _first_file_flipped(step_dir):
  """Flips one byte in the middle of the largest file of a checkpoint step."""
  size, path = max((os.path.getsize(os.path.join(d, n)), os.path.join(d, n))
                   for d, _, names in os.walk(step_dir) for n in names)
  with open(path, 'r+b') as f:
    f.seek(size // 2)
    byte = f.read(1)
    f.seek(size // 2)
    f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize('damage', ['flipped', 'unrecorded'])
def test_a_checkpoint_whose_content_changed_is_never_restored(setup, tmp_path, caplog, damage):
  """Checkpoints at steps 3 and 6, the newest changed after its save (or with no checksum
  recorded): it is moved aside with one warning, the protocol resumes from step 3, and the
  result equals an uninterrupted run's."""
  whole = _train(setup, str(tmp_path / 'whole'))
  directory = str(tmp_path / 'cut')
  _train(setup, directory, max_steps=7)
  checkpoints_dir = os.path.join(directory, 'checkpoints')
  assert sorted(int(n) for n in os.listdir(checkpoints_dir) if n.isdigit()) == [3, 6]
  if damage == 'flipped':
    _first_file_flipped(os.path.join(checkpoints_dir, '6'))
  else:
    sums = os.path.join(directory, linear_paper_store.CHECKSUMS)
    with open(sums) as f:
      kept = {k: v for k, v in json.load(f).items() if k != '6'}
    with open(sums, 'w') as f:
      json.dump(kept, f)
  with caplog.at_level('INFO'):
    resumed = _train(setup, directory)
  said = [r.getMessage() for r in caplog.records if 'is not used' in r.getMessage()]
  assert len(said) == 1 and 'step 6' in said[0], said
  assert any('Resuming the paper linear protocol at step 3' in r.getMessage()
             for r in caplog.records)
  assert os.path.isdir(os.path.join(directory, 'checkpoints_corrupt', '6'))
  jax.tree.map(np.testing.assert_array_equal, resumed['params'], whole['params'])
  assert resumed['rows'] == whole['rows']
