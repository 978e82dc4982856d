"""The MoCo paper's linear protocol (`eval.linear_protocol=paper`), as the official main_lincls.py.

The other protocols (`linear_probe.py`) train on features computed once from
the centre view. This one trains the classifier as the paper does, so that its
number can be compared with the paper's (60.6 / 67.5 top-1 on ImageNet):
  * the backbone is frozen and in inference mode (BatchNorm running stats, no
    update: main_lincls.py's `model.eval()`); only a new linear layer
    (weight N(0, 0.01), bias 0) trains;
  * train views are drawn anew every epoch: RandomResizedCrop(image_size,
    scale `eval.linear_crop_scale` (torchvision's default (0.08, 1)), ratio
    (3/4, 4/3)) + horizontal flip + Normalize. Each example's view is a pure
    function of (seed, epoch, dataset index), so a resumed run draws the same
    views and ends bit for bit where an uninterrupted one does;
  * val: Resize(image_size / eval.linear_center_crop) + CenterCrop(image_size)
    (256 / 224 at 224 px). The backbone is frozen, so the val features are
    computed once and each epoch's val top-1 costs one matmul;
  * SGD, momentum 0.9 (torch's: buf = m * buf + g; w -= lr * buf), weight
    decay `eval.linear_weight_decay` (0), lr `eval.linear_lr` x batch / 256
    (30 at batch 256), x0.1 at each epoch of `eval.linear_step_epochs` (60, 80;
    absolute epochs, as the official adjust_learning_rate: lr constant within an
    epoch), `eval.linear_epochs` (100), batch `eval.linear_batch_size` (256).
Two documented differences: each epoch's ragged tail (< 1 batch) is dropped
(every step has the same shape), and the in-memory path crops from the cached
centre square (`data.cache_size`), not from the whole original image (the
training in-memory path does the same).

Data-parallel like training: one `jax.shard_map` under `jax.jit` per step, the
batch split on 'data', the classifier's gradients pmean-ed (equal shards, so
the mean of the shards' mean gradients is the global batch's).

A long job on ImageNet (100 epochs of a ResNet-50 forward pass): its state
(classifier, momentum buffer, step, the epoch's running sums) is checkpointed
with Orbax under WORKDIR/linear_paper/ (WORKDIR/random_init_linear_paper/ for
the floor) at the end of every epoch and on SIGTERM / Ctrl-C
(`moco_jax.run.stopping`); a rerun of the same command resumes at the saved
step. Each epoch appends a row to metrics.jsonl there (lr, train loss and
top-1, val top-1/top-5) and redraws curves.png. Results: eval.json keys
`linear_paper_top1`, `_top5`, `_epochs`, `_lr`, `_step`.
"""

import functools
import hashlib
import math
import os
import time
from typing import Iterator

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moco_jax.core import errors
from moco_jax.core import files
from moco_jax.core import parallel
from moco_jax.data import batching
from moco_jax.data.dataset import ImageDataset, StreamSource
from moco_jax.data import host_crops
from moco_jax.data import sources
from moco_jax.data import streaming
from moco_jax.evaluation import classifier
from moco_jax.evaluation import features
from moco_jax.evaluation import frozen
from moco_jax.evaluation import linear_paper_ops as ops
from moco_jax.evaluation import linear_paper_store as store
from moco_jax.evaluation import results
from moco_jax.run import metrics_writer
from moco_jax.run import stopping



# --------------------------------------------------------------------------
# The data-parallel train step.


@functools.lru_cache(maxsize=4)
def make_train_step(backbone, mesh: Mesh, image_size: int, scale: tuple, ratio: tuple,
                    norm: ops.Norm, dtype: str, weight_decay: float, seed: int,
                    host_cropped: bool = False):
  """jit(shard_map(step)): (cls, buf, variables, images, labels, indices, epoch, lr) ->
  (cls, buf, mean loss, correct count).

  Each device draws its examples' views from (seed, epoch, index), runs the
  frozen backbone in inference mode (its variables are an input, never an
  output: nothing of the backbone can change), and the classifier's gradients
  are averaged over the mesh before the SGD update, identical on every device.
  `host_cropped`: the images are the host's crops (streamed input).
  """

  def step(cls, buf, variables, images, labels, indices, epoch, lr):
    keys = jax.vmap(lambda i: ops.view_key(seed, epoch, i))(indices)
    views = jax.vmap(lambda k, im: ops.train_view(k, im, image_size, scale, ratio, norm,
                                              crop=not host_cropped))(keys, images)
    feats = backbone.apply(variables, views.astype(jnp.dtype(dtype)), train=False)
    feats = jax.lax.stop_gradient(feats.astype(jnp.float32))

    def loss_fn(p):
      logits = classifier.logits_fn(p, feats)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(cls)
    grads = jax.lax.pmean(grads, parallel.AXIS)
    cls, buf = ops.sgd_momentum(cls, buf, grads, lr, weight_decay)
    correct = jnp.sum(jnp.argmax(logits, axis=-1) == labels).astype(jnp.int32)
    return (cls, buf, jax.lax.pmean(loss, parallel.AXIS),
            jax.lax.psum(correct, parallel.AXIS))

  data = P(parallel.AXIS)
  sharded = jax.shard_map(step, mesh=mesh,
                          in_specs=(P(), P(), P(), data, data, data, P(), P()),
                          out_specs=(P(), P(), P(), P()), check_vma=False)
  return jax.jit(sharded)


# --------------------------------------------------------------------------
# State (its checkpoints and curve: linear_paper_store.py).


def initial_state(seed: int, num_features: int, num_classes: int, backbone_step: int) -> dict:
  """Step 0: the official init, a zero momentum buffer and empty epoch sums.

  `backbone_step` records which pretraining checkpoint the classifier sits on,
  so a resume on another one is refused instead of mixing the two.
  """
  cls = classifier.init_classifier(jax.random.PRNGKey(seed), num_features, num_classes)
  return {'params': cls, 'momentum': jax.tree.map(jnp.zeros_like, cls),
          'step': np.int64(0), 'loss_sum': np.float64(0.0), 'correct_sum': np.int64(0),
          'backbone_step': np.int64(backbone_step)}


# --------------------------------------------------------------------------
# The run.


def _check_batch(batch: int, num_train: int, mesh: Mesh) -> int:
  if batch % mesh.size:
    raise errors.ConfigError(
        f'config.eval.linear_batch_size={batch} must be a multiple of the {mesh.size} devices '
        '(each gets an equal slice): round it to one.')
  steps = num_train // batch
  if steps == 0:
    raise errors.ConfigError(
        f'config.eval.linear_batch_size={batch} is larger than the train split ({num_train} '
        'images): lower it.')
  return steps


def val_accuracy(params: dict, val_features: np.ndarray, labels: np.ndarray) -> tuple:
  """(top-1, top-5) percent of the classifier on the precomputed val features."""
  logits = np.asarray(classifier.logits_fn(params, jnp.asarray(val_features)))
  return (classifier.topk_accuracy(logits, labels, 1),
          classifier.topk_accuracy(logits, labels, 5))


class _Progress:
  """Logs steps/s, img/s, ETA and the running loss every `every` seconds."""

  def __init__(self, total_steps: int, start_step: int, batch: int, every: float = 30.0):
    self.total, self.batch, self.every = total_steps, batch, every
    self.start_step, self.start = start_step, time.perf_counter()
    self.last = self.start

  def maybe_log(self, step: int, epoch: int, loss: float):
    now = time.perf_counter()
    if now - self.last < self.every and step < self.total:
      return
    self.last = now
    rate = (step - self.start_step) / max(now - self.start, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else float('inf')
    logging.info('Linear (paper) step %d/%d, epoch %d: loss %.4f, %.2f steps/s, %.0f img/s, '
                 'ETA %s.', step, self.total, epoch + 1, loss, rate, rate * self.batch,
                 metrics_writer.format_duration(eta) if math.isfinite(eta) else '?')


def local_batches(config, train_ds, batch: int, start: int, end: int) -> Iterator[dict]:
  """This process's slice of global batches start..end-1: {'image', 'label', 'index' (int32)}.

  In memory (an `ImageDataset`): the cached squares, cropped on the device.
  Streamed (a `StreamSource`): each image decoded once per epoch and its crop cut
  on the host from the whole original (`host_crops`, one view per example from
  `linear_uniforms(seed, epoch, index)`), the grain loader of training.
  Both: the examples of step s are `train_indices(N, batch, seed, s)`.
  """
  seed, local = int(config.seed), batch // jax.process_count()
  if isinstance(train_ds, StreamSource):
    spec = sources.from_config(config).spec
    processes, threads = host_crops.loader_workers(spec)
    stream = host_crops.train_batches(
        train_ds, global_batch=batch, seed=seed, image_size=spec.image_size,
        crop_scale=tuple(config.eval.linear_crop_scale), crop_ratio=tuple(config.aug.crop_ratio),
        start_step=start, end_step=end, process_index=jax.process_index(),
        process_count=jax.process_count(), num_threads=threads, num_processes=processes,
        uniforms=host_crops.linear_uniforms)
    try:
      for b in stream:
        yield {'image': b['image'][:, 0], 'label': b['label'], 'index': b['index'].astype(np.int32)}
    finally:  # Stops grain's workers and frees their shared memory on an early exit too.
      stream.close()
    return
  first = jax.process_index() * local
  for step in range(start, end):
    idx = batching.train_indices(len(train_ds), batch, seed, step)[first:first + local]
    yield {'image': np.take(train_ds.images, idx, axis=0),
           'label': np.take(train_ds.labels, idx, axis=0), 'index': idx.astype(np.int32)}


def protocol_fields(config, backbone_step: int, variables, num_examples: int,
                    num_classes: int) -> dict:
  """The values that define the protocol's result: a resume must keep every one."""
  ec = config.eval
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(jax.device_get(variables)):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  plain = lambda v: [float(x) for x in v]
  return {'linear_epochs': int(ec.linear_epochs), 'linear_batch_size': int(ec.linear_batch_size),
          'linear_lr': float(ec.linear_lr), 'linear_step_epochs': plain(ec.linear_step_epochs),
          'linear_weight_decay': float(ec.linear_weight_decay),
          'linear_crop_scale': plain(ec.linear_crop_scale),
          'linear_center_crop': float(ec.linear_center_crop), 'seed': int(config.seed),
          'image_size': int(config.data.image_size), 'crop_ratio': plain(config.aug.crop_ratio),
          'backbone_step': int(backbone_step), 'backbone_sha256': digest.hexdigest(),
          'train_examples': int(num_examples), 'classes': int(num_classes)}


def train_paper_classifier(config, backbone, variables, train_ds,
                           val_features: np.ndarray, val_labels: np.ndarray, num_classes: int,
                           mesh: Mesh, directory: str, backbone_step: int = 0,
                           max_steps=None) -> dict:
  """Trains (or resumes) the classifier under `directory`; returns its final state.

  `train_ds`: an `ImageDataset` (in memory) or a `StreamSource` (streamed).

  `max_steps` stops after that global step (tests: a run cut short, as a
  SIGKILL would) without finishing the protocol.
  """
  ec = config.eval
  num = len(train_ds)
  batch = int(ec.linear_batch_size)
  steps_per_epoch = _check_batch(batch, num, mesh)
  epochs = int(ec.linear_epochs)
  total = epochs * steps_per_epoch
  lr0 = ops.base_lr(ec, batch)
  milestones = tuple(int(m) for m in ec.linear_step_epochs)
  step_fn = make_train_step(backbone, mesh, int(config.data.image_size),
                            tuple(float(v) for v in ec.linear_crop_scale),
                            tuple(float(v) for v in config.aug.crop_ratio),
                            ops.Norm(tuple(config.aug.mean), tuple(config.aug.std)),
                            config.model.dtype, float(ec.linear_weight_decay), int(config.seed),
                            host_cropped=isinstance(train_ds, streaming.StreamSource))
  fields = protocol_fields(config, backbone_step, variables, num, num_classes)
  store.check_protocol(directory, fields, os.path.isdir(os.path.join(directory, 'checkpoints'))
                       and any(n.isdigit() for n in os.listdir(os.path.join(directory,
                                                                             'checkpoints'))))
  files.make_dir(directory, 'the paper probe checkpoints')
  manager = store.manager(directory)
  if jax.process_index() == 0:
    store.record_protocol(directory, fields)
  state = store.restore(manager, initial_state(config.seed, val_features.shape[1], num_classes,
                                          backbone_step))
  start = int(state['step'])
  rows = [r for r in store.read_curve(directory) if r['epoch'] <= start // steps_per_epoch]
  if start:
    logging.info('Resuming the paper linear protocol at step %d/%d (epoch %d) from %s.', start,
                 total, start // steps_per_epoch + 1, manager.directory)
  replicated = NamedSharding(mesh, P())
  variables = jax.device_put(variables, replicated)
  cls = jax.device_put(state['params'], replicated)
  buf = jax.device_put(state['momentum'], replicated)
  loss_sum, correct_sum = float(state['loss_sum']), int(state['correct_sum'])
  end = total if max_steps is None else min(total, int(max_steps))
  progress = _Progress(total, start, batch)
  step = start
  batches = local_batches(config, train_ds, batch, start, end)
  with stopping.StopWatcher(jax.process_count()) as watcher:
    while step < end:
      epoch = step // steps_per_epoch
      lr = ops.epoch_lr(lr0, epoch, milestones)
      b = next(batches)
      images, labels, indices = (parallel.shard_batch(b[k], mesh)
                                 for k in ('image', 'label', 'index'))
      cls, buf, loss, correct = step_fn(cls, buf, variables, images, labels, indices,
                                        jnp.int32(epoch), jnp.float32(lr))
      loss = float(loss)
      if not math.isfinite(loss):
        raise errors.NonFiniteError(
            f'The paper linear protocol diverged at step {step + 1} (epoch {epoch + 1}, lr '
            f'{lr:g}): train loss {loss}. Lower config.eval.linear_lr.')
      loss_sum += loss
      correct_sum += int(correct)
      step += 1
      progress.maybe_log(step, epoch, loss)
      epoch_done = step % steps_per_epoch == 0
      if epoch_done:
        val1, val5 = val_accuracy(jax.device_get(cls), val_features, val_labels)
        row = {'epoch': epoch + 1, 'step': step, 'lr': lr,
               'train_loss': loss_sum / steps_per_epoch,
               'train_top1': 100.0 * correct_sum / (steps_per_epoch * batch),
               'val_top1': val1, 'val_top5': val5}
        rows.append(row)
        logging.info('Linear (paper) epoch %d/%d: lr %g, train loss %.4f, train top-1 %.2f%%, '
                     'val top-1 %.2f%%, top-5 %.2f%%.', epoch + 1, epochs, lr,
                     row['train_loss'], row['train_top1'], val1, val5)
        loss_sum, correct_sum = 0.0, 0
      stop = watcher.requested(manager, step)
      if epoch_done or stop:
        state = {'params': cls, 'momentum': buf, 'step': np.int64(step),
                 'loss_sum': np.float64(loss_sum), 'correct_sum': np.int64(correct_sum),
                 'backbone_step': np.int64(backbone_step)}
        store.save(manager, state)
        if epoch_done and jax.process_index() == 0:
          store.write_curve(directory, rows)
      if stop:
        manager.close()
        raise stopping.Interrupted(watcher.signum, step, True, str(manager.directory))
  manager.close()
  return {'params': jax.device_get(cls), 'momentum': jax.device_get(buf), 'step': step,
          'rows': rows, 'lr': lr0, 'done': step >= total}


def _num_classes(train_ds) -> int:
  if isinstance(train_ds, ImageDataset):
    return train_ds.num_classes
  return len(train_ds.class_names)


def run_paper_linear_eval(config, workdir: str) -> dict:
  """The paper's protocol on the latest checkpoint (or random init) -> WORKDIR/eval.json.

  Returns:
    {'<prefix>linear_paper_top1', _top5, _epochs, _lr, _step}.
  """
  start = time.perf_counter()
  backbone, variables, step, prefix = frozen.load_backbone(config, workdir)
  mesh = parallel.make_mesh()
  data = sources.from_config(config)
  train_ds = streaming.open_split(data, 'train').data  # In memory, or streamed if too large.
  eval_ds = data.load('eval')
  num_classes = max(_num_classes(train_ds), eval_ds.num_classes)
  val_ds = ops.center_crop_split(eval_ds, float(config.eval.linear_center_crop))
  logging.info('Paper linear protocol: val features of %d images (centre %.3f of each, resized to '
               '%d px), once: the backbone is frozen.', len(val_ds), config.eval.linear_center_crop,
               data.spec.image_size)
  val_features = features.extract_features(config, backbone, variables, val_ds, mesh,
                                           normalize=False)
  logging.info('Val features %s in %.1f s.', val_features.shape, time.perf_counter() - start)
  directory = store.result_dir(workdir, prefix)
  out = train_paper_classifier(config, backbone, variables, train_ds, val_features,
                               eval_ds.labels, num_classes, mesh, directory, step)
  top1, top5 = val_accuracy(out['params'], val_features, eval_ds.labels)
  logging.info('Linear (paper protocol, step %d%s, %d epochs, lr %g): top-1 %.2f%%, top-5 '
               '%.2f%%, %.1f s in all; curve in %s.', step, ', random init' if prefix else '',
               config.eval.linear_epochs, out['lr'], top1, top5, time.perf_counter() - start,
               directory)
  stem = f'{prefix}linear_paper_'
  found = {stem + 'top1': top1, stem + 'top5': top5,
           stem + 'epochs': int(config.eval.linear_epochs), stem + 'lr': out['lr'],
           stem + 'step': step}
  results.write_results(workdir, found)
  return found
