"""kNN evaluation of frozen backbone features (the InstDisc / MoCo CIFAR monitor).

Every labelled train image and every eval image goes through the QUERY
backbone in inference mode (BatchNorm running statistics, no projection head);
the features are L2-normalised, each eval image takes its k nearest train
images by cosine similarity, and each neighbour votes for its label with weight
exp(similarity / t). This is the monitor of the official MoCo CIFAR-10 demo
(k = 200, t = 0.1) and of lightly's benchmarks: it needs no training, so it can
run every few epochs during pretraining.

Units: `knn_top1` is a percentage (0-100) everywhere (metrics.jsonl, eval.json,
docs/results.md), like the official demo's 82.6; lightly reports fractions
(0.786 = 78.6 %).
"""

import functools
import time
from typing import Callable, NamedTuple, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moco_jax import augment
from moco_jax import input_pipeline
from moco_jax import losses
from moco_jax import models

AXIS = 'data'  # The mesh axis of moco_jax.train (not imported: train imports us).
# Eval images per kNN chunk: the similarity block is [chunk, num_train] float32,
# 256 x 50,000 x 4 bytes = 51 MB for CIFAR-10, whatever the eval split's size.
_QUERY_CHUNK = 256


# --------------------------------------------------------------------------
# Feature extraction.


def eval_batch_size(requested: int, num_devices: int) -> int:
  """`requested` rounded up to a multiple of the device count (each gets a slice)."""
  return max(1, -(-requested // num_devices)) * num_devices


class _NormConfig(NamedTuple):
  """The two fields of config.aug that `augment.eval_view` reads, hashable for the cache."""
  mean: tuple
  std: tuple


@functools.lru_cache(maxsize=8)
def _feature_fn(backbone, image_size: int, mean: tuple, std: tuple, dtype: str, mesh: Mesh,
                normalize: bool) -> Callable:
  """jit(shard_map(features)) of one batch; cached so each shape compiles once per run.

  Variables are replicated, uint8 images split on 'data'; each device runs the
  deterministic eval view and the backbone on its slice, so extraction is
  data-parallel with no collective at all.
  """
  aug = _NormConfig(mean, std)

  def features(variables, images):
    x = augment.eval_view(images, image_size, aug, jnp.dtype(dtype))
    f = backbone.apply(variables, x, train=False)
    return losses.l2_normalize(f) if normalize else f

  sharded = jax.shard_map(features, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS),
                          check_vma=False)
  return jax.jit(sharded)


def backbone_variables(params, batch_stats) -> dict:
  """The backbone's variables out of an encoder's (query) params and batch stats."""
  return {'params': params['backbone'], 'batch_stats': batch_stats['backbone']}


def extract_features(config, backbone, variables, ds: input_pipeline.ImageDataset, mesh: Mesh,
                     normalize: bool = True) -> np.ndarray:
  """Backbone features [N, C] float32 of every image of `ds`, in dataset order.

  Args:
    config: the full config (reads data.image_size, aug.mean/std, model.dtype,
      eval.batch_size).
    backbone: a `models.ResNet` (inference mode is chosen here).
    variables: {'params', 'batch_stats'} of the backbone, replicated on `mesh`
      or host arrays.
    ds: the split to encode.
    mesh: the one-axis ('data',) mesh.
    normalize: L2-normalise each feature (kNN) or not (linear probe).
  """
  batch = eval_batch_size(config.eval.batch_size, mesh.size)
  fn = _feature_fn(backbone, config.data.image_size, tuple(config.aug.mean),
                   tuple(config.aug.std), config.model.dtype, mesh, normalize)
  replicated = NamedSharding(mesh, P())
  variables = jax.device_put(variables, replicated)
  data_sharding = NamedSharding(mesh, P(AXIS))
  chunks = []
  for b in input_pipeline.eval_batches(ds, global_batch=batch, process_index=jax.process_index(),
                                       process_count=jax.process_count()):
    images = jax.make_array_from_process_local_data(data_sharding, b['image'])
    out = fn(variables, images)
    # The last batch is padded; the mask keeps the real rows.
    chunks.append((_to_host(out), b['mask']))
  rows = [f[m] if jax.process_count() == 1 else f[_global_mask(m)] for f, m in chunks]
  features = np.concatenate(rows, axis=0).astype(np.float32)
  if features.shape[0] != len(ds):
    raise AssertionError(f'extracted {features.shape[0]} features for {len(ds)} images')
  return features


def _to_host(array: jax.Array) -> np.ndarray:
  """A global (possibly multi-host) array as one host NumPy array."""
  if jax.process_count() == 1:
    return np.asarray(array)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _global_mask(local_mask: np.ndarray) -> np.ndarray:
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(local_mask, tiled=True))


# --------------------------------------------------------------------------
# The classifier.


@functools.partial(jax.jit, static_argnames=('num_classes', 'k'))
def _knn_chunk(train_features, train_labels, queries, temperature, *, num_classes: int, k: int):
  """Class scores [chunk, num_classes] of a chunk of L2-normalised queries."""
  similarity = queries @ train_features.T  # [chunk, N]: cosine, features are unit rows.
  top_sim, top_idx = jax.lax.top_k(similarity, k)
  weights = jnp.exp(top_sim / temperature)
  votes = jax.nn.one_hot(train_labels[top_idx], num_classes, dtype=weights.dtype)
  return jnp.einsum('qk,qkc->qc', weights, votes)


def knn_scores(train_features: np.ndarray, train_labels: np.ndarray, query_features: np.ndarray,
               num_classes: int, k: int = 200, temperature: float = 0.1,
               chunk: int = _QUERY_CHUNK) -> np.ndarray:
  """Weighted kNN vote: scores [Q, num_classes] (InstDisc / MoCo CIFAR demo).

  Queries go through in chunks of `chunk` (the last one padded), so memory is
  bounded by chunk x N similarities whatever Q is; one shape compiles once.
  `k` is clipped to the number of train features.
  """
  if temperature <= 0:
    raise ValueError(f'config.eval.knn_temperature={temperature} must be > 0 (paper: 0.1).')
  if k <= 0:
    raise ValueError(f'config.eval.knn_k={k} must be > 0 (paper: 200).')
  k = min(int(k), int(train_features.shape[0]))
  bank = jnp.asarray(train_features, jnp.float32)
  labels = jnp.asarray(train_labels, jnp.int32)
  num = query_features.shape[0]
  chunk = max(1, min(chunk, num))
  out = []
  for start in range(0, num, chunk):
    q = query_features[start:start + chunk]
    real = q.shape[0]
    if real < chunk:
      q = np.concatenate([q, np.zeros((chunk - real,) + q.shape[1:], q.dtype)])
    scores = _knn_chunk(bank, labels, jnp.asarray(q, jnp.float32), float(temperature),
                        num_classes=int(num_classes), k=k)
    out.append(np.asarray(scores)[:real])
  return np.concatenate(out, axis=0)


def knn_top1(train_features, train_labels, query_features, query_labels, num_classes: int,
             k: int = 200, temperature: float = 0.1) -> float:
  """Top-1 accuracy of the weighted kNN vote, in percent."""
  scores = knn_scores(train_features, train_labels, query_features, num_classes, k, temperature)
  correct = np.argmax(scores, axis=1) == np.asarray(query_labels)
  return float(100.0 * np.sum(correct) / correct.size)  # Sum first: 46.76, not 46.760000000000005.


# --------------------------------------------------------------------------
# One evaluation and the monitor hooks.


class KnnEvaluator:
  """Loads the labelled train split and the eval split once; scores any backbone.

  The splits stay in host memory for the whole run (uint8, decoded once), so
  each monitor call only pays for the forward passes and the vote.
  """

  def __init__(self, config, mesh: Mesh, train_ds=None, eval_ds=None):
    self.config = config
    self.mesh = mesh
    if train_ds is None:
      train_ds = input_pipeline.load_split(config.data, 'train')
    if eval_ds is None:
      eval_ds = input_pipeline.load_split(config.data, 'eval')
    self.train_ds, self.eval_ds = train_ds, eval_ds
    self.backbone = models.create_backbone(config.model)
    if self.train_ds.num_classes < 2:
      raise ValueError(f'The train split has {self.train_ds.num_classes} class(es): kNN needs '
                       'labels; check config.data.path / config.data.train_split.')

  def __call__(self, variables) -> float:
    """kNN top-1 (percent) of the backbone with `variables` ({'params', 'batch_stats'})."""
    start = time.perf_counter()
    train_features = extract_features(self.config, self.backbone, variables, self.train_ds,
                                      self.mesh)
    eval_features = extract_features(self.config, self.backbone, variables, self.eval_ds,
                                     self.mesh)
    top1 = knn_top1(train_features, self.train_ds.labels, eval_features, self.eval_ds.labels,
                    max(self.train_ds.num_classes, self.eval_ds.num_classes),
                    k=self.config.eval.knn_k, temperature=self.config.eval.knn_temperature)
    logging.info('kNN top-1 %.2f%% (k=%d, t=%g, %d train / %d eval images) in %.1f s.', top1,
                 self.config.eval.knn_k, self.config.eval.knn_temperature, len(self.train_ds),
                 len(self.eval_ds), time.perf_counter() - start)
    return top1


def monitor_steps(every_epochs: float, steps_per_epoch: int, total_steps: int) -> set:
  """Steps after which the monitor runs: every `every_epochs` epochs and at the end.

  every_epochs -1 (or any negative) means never, 0 only at the end.
  """
  if every_epochs < 0:
    return set()
  steps = {total_steps}
  if every_epochs > 0:
    period = max(1, int(round(every_epochs * steps_per_epoch)))
    steps.update(range(period, total_steps + 1, period))
  return steps


def make_monitor_hooks(config, workdir: str, mesh: Mesh, setup, steps_per_epoch: int,
                       total_steps: int, writer, evaluator: Optional[KnnEvaluator] = None):
  """Hooks `hook(step, state)` for the pretraining loop: the kNN monitor.

  Writes {'knn_top1': percent, 'epoch': ...} to metrics.jsonl at the steps of
  `monitor_steps(config.eval.knn_every_epochs, ...)`. The data are loaded here,
  once, and only if the monitor runs at all.
  """
  del workdir, setup  # The backbone comes from config.model; inference needs no BN groups.
  steps = monitor_steps(config.eval.knn_every_epochs, steps_per_epoch, total_steps)
  if not steps:
    return []
  evaluator = evaluator or KnnEvaluator(config, mesh)

  def hook(step: int, state):
    if step not in steps:
      return
    top1 = evaluator(backbone_variables(state.query_params, state.query_batch_stats))
    writer.write(step, {'knn_top1': top1, 'epoch': step / max(steps_per_epoch, 1)})

  return [hook]
