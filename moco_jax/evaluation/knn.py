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
from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from moco_jax.core import errors
from moco_jax.core import parallel
from moco_jax.data import eval_reader
from moco_jax.data import sources
from moco_jax.data import streaming
from moco_jax.evaluation import feature_store
from moco_jax.evaluation import features
from moco_jax.evaluation import frozen
from moco_jax.evaluation import label_check
from moco_jax.evaluation import results
from moco_jax.methods import contrastive
from moco_jax import models

# Eval images per kNN chunk: the similarity block is [chunk, num_train] float32,
# 256 x 50,000 x 4 bytes = 51 MB for CIFAR-10, whatever the eval split's size.
_QUERY_CHUNK = 256


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
  _check_vote(k, temperature)
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


# Streamed kNN: train features per block (read from the float16 file), eval
# queries per chunk; the similarity block is [query chunk, block] float32.
_TRAIN_BLOCK = 16384
_STREAM_QUERY_CHUNK = 1024


@functools.partial(jax.jit, static_argnames=('k',), donate_argnums=(0, 1))
def _merge_top_k(top_sim, top_idx, queries, block, block_start, block_valid, *, k: int):
  """The running top-k [chunk, k] of similarities and train indices, merged with one block.

  The running entries come first, so among equal similarities the lower train
  index wins, as a top-k over the whole bank (`lax.top_k` keeps the lower
  position first on ties): the result equals a plain top-k of all rows seen.
  """
  block = contrastive.l2_normalize(block)
  similarity = queries @ block.T  # [chunk, block]
  similarity = jnp.where(block_valid[None, :], similarity, -jnp.inf)
  index = block_start + jnp.arange(block.shape[0], dtype=jnp.int32)
  both_sim = jnp.concatenate([top_sim, similarity], axis=1)
  both_idx = jnp.concatenate([top_idx, jnp.broadcast_to(index, similarity.shape)], axis=1)
  top_sim, position = jax.lax.top_k(both_sim, k)
  return top_sim, jnp.take_along_axis(both_idx, position, axis=1)


def blockwise_top_k(blocks, num_train: int, queries: np.ndarray, k: int,
                    chunk: int = _STREAM_QUERY_CHUNK):
  """(similarities [Q, k], train indices [Q, k]) of the k most similar train rows per query.

  Args:
    blocks: iterable of (start, rows float [b, D], valid bool [b]) covering the
      train rows once, in order (rows are L2-normalised here).
    num_train: number of train rows (k is clipped to it by the caller).
    queries: float [Q, D], L2-normalised here.
    chunk: queries per device call; the state for all queries stays on the
      device (Q x k x 8 bytes: 50,000 x 200 -> 80 MB).

  Every train block is read once, whatever Q is. Rows that are not valid (and
  padding) get similarity -inf and never enter the top-k while k <= valid rows.
  """
  num_q = queries.shape[0]
  chunk = max(1, min(chunk, num_q))
  padded = -(-num_q // chunk) * chunk
  q = np.zeros((padded, queries.shape[1]), np.float32)
  q[:num_q] = queries
  q_chunks = [contrastive.l2_normalize(jnp.asarray(q[i:i + chunk])) for i in range(0, padded, chunk)]
  state = [(jnp.full((chunk, k), -jnp.inf, jnp.float32), jnp.full((chunk, k), -1, jnp.int32))
           for _ in q_chunks]
  block_size = None
  for start, rows, valid in blocks:
    rows = np.asarray(rows, np.float32)
    block_size = block_size or rows.shape[0]
    if rows.shape[0] < block_size:  # One shape for every call: pad the last block.
      pad = block_size - rows.shape[0]
      rows = np.concatenate([rows, np.zeros((pad, rows.shape[1]), np.float32)])
      valid = np.concatenate([valid, np.zeros((pad,), bool)])
    rows, valid = jnp.asarray(rows), jnp.asarray(valid)
    state = [_merge_top_k(s, i, qc, rows, jnp.int32(start), valid, k=k)
             for (s, i), qc in zip(state, q_chunks)]
  del num_train
  sims = np.concatenate([np.asarray(s) for s, _ in state])[:num_q]
  idx = np.concatenate([np.asarray(i) for _, i in state])[:num_q]
  return sims, idx


def knn_scores_streamed(train, query_features: np.ndarray, num_classes: int, k: int = 200,
                        temperature: float = 0.1, block: int = _TRAIN_BLOCK) -> np.ndarray:
  """`knn_scores` over stored train features (`feature_store.StoredFeatures`), in blocks.

  The vote is the in-memory one: exp(similarity / t) for each of the k
  nearest valid train rows, summed per label.
  """
  _check_vote(k, temperature)
  k = min(int(k), int(train.valid.sum()))

  def blocks():
    for start in range(0, len(train), block):
      yield (start, train.features[start:start + block], train.valid[start:start + block])

  sims, idx = blockwise_top_k(blocks(), len(train), query_features, k)
  weights = np.exp(sims.astype(np.float64) / temperature)
  scores = np.zeros((sims.shape[0], num_classes), np.float64)
  np.add.at(scores, (np.arange(sims.shape[0])[:, None], np.asarray(train.labels)[idx]), weights)
  return scores


def _check_vote(k: int, temperature: float) -> None:
  if temperature <= 0:
    raise errors.ConfigError(f'config.eval.knn_temperature={temperature} must be > 0 (paper: 0.1).')
  if k <= 0:
    raise errors.ConfigError(f'config.eval.knn_k={k} must be > 0 (paper: 200).')


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
  each monitor call only pays for the forward passes and the vote. A split
  too large for `data.max_in_memory_gb` is replaced by a fixed random subset
  that fits (`eval_reader.bounded_split`, logged): the monitor of a streamed
  run follows the trend on that subset.
  """

  def __init__(self, config, mesh: Mesh, train_ds=None, eval_ds=None, data=None):
    """`data` (a `sources.Source`, default the one `config` names) gives the splits not passed."""
    self.config = config
    self.mesh = mesh
    if train_ds is None or eval_ds is None:
      data = data or sources.from_config(config)
    if train_ds is None:
      train_ds = eval_reader.bounded_split(data, 'train', 'kNN monitor')
    if eval_ds is None:
      eval_ds = eval_reader.bounded_split(data, 'eval', 'kNN monitor')
    self.train_ds, self.eval_ds = train_ds, eval_ds
    self.backbone = models.create_backbone(config.model)
    if self.train_ds.num_classes < 2:
      raise label_check.refusal(self.train_ds.num_classes, 'the train split', 'knn')

  def __call__(self, variables) -> float:
    """kNN top-1 (percent) of the backbone with `variables` ({'params', 'batch_stats'})."""
    start = time.perf_counter()
    train_features = features.extract_features(self.config, self.backbone, variables, self.train_ds,
                                      self.mesh)
    eval_features = features.extract_features(self.config, self.backbone, variables, self.eval_ds,
                                     self.mesh)
    k = used_k(self.config.eval.knn_k, len(self.train_ds))
    top1 = knn_top1(train_features, self.train_ds.labels, eval_features, self.eval_ds.labels,
                    max(self.train_ds.num_classes, self.eval_ds.num_classes),
                    k=k, temperature=self.config.eval.knn_temperature)
    logging.info('kNN top-1 %.2f%% (k=%d, t=%g, %d train / %d eval images) in %.1f s.', top1,
                 k, self.config.eval.knn_temperature, len(self.train_ds),
                 len(self.eval_ds), time.perf_counter() - start)
    return top1


def used_k(knn_k: int, train_size: int) -> int:
  """The k the vote uses: config.eval.knn_k, or the whole train split if that is smaller (said).

  Said at every evaluation, not once per process: a per-process "first time
  only" would stay silent for a second run in the same process (a notebook).
  """
  if knn_k > train_size:
    logging.warning('config.eval.knn_k=%d is larger than the train split (%d images): using '
                    'k=%d (every train image votes); lower --config.eval.knn_k to silence this.',
                    knn_k, train_size, train_size)
  return min(int(knn_k), int(train_size))


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


def make_monitor_hooks(config, data, mesh: Mesh, steps_per_epoch: int, total_steps: int, writer,
                       evaluator: Optional[KnnEvaluator] = None, train_ds=None):
  """Hooks `hook(step, state)` for the pretraining loop: the kNN monitor.

  Writes {'knn_top1': percent, 'epoch': ...} to metrics.jsonl at the steps of
  `monitor_steps(config.eval.knn_every_epochs, ...)`. The eval split is loaded
  here, once, and only if the monitor runs at all; pass the trainer's decoded
  `train_ds` so the train split is held in memory once, not twice.
  """
  steps = monitor_steps(config.eval.knn_every_epochs, steps_per_epoch, total_steps)
  if not steps:
    return []
  classes = (len(train_ds.class_names) if train_ds is not None
             else label_check.class_count(data))
  if evaluator is None and classes is not None and classes < 2:
    logging.info('kNN monitor: off (the train split has %s); --mode=embed and --mode=report '
                 'evaluate an unlabeled run.', 'no labels' if not classes else 'one class')
    return []
  try:
    evaluator = evaluator or KnnEvaluator(config, mesh, train_ds=train_ds, data=data)
  except errors.DataError as e:
    if data.spec.kind != 'listed':
      raise
    logging.info('kNN monitor: off (%s).', e)  # E.g. a list without an eval split.
    return []
  logging.info('kNN monitor: %d train / %d eval images, %d classes, after steps %s.',
               len(evaluator.train_ds), len(evaluator.eval_ds),
               max(evaluator.train_ds.num_classes, evaluator.eval_ds.num_classes),
               _steps_text(sorted(steps)))

  def hook(step: int, state):
    if step not in steps:
      return
    top1 = evaluator(frozen.backbone_variables(state.params, state.batch_stats))
    writer.write(step, {'knn_top1': top1, 'epoch': step / max(steps_per_epoch, 1)})

  return [hook]


def _steps_text(steps: list) -> str:
  return ', '.join(map(str, steps)) if len(steps) <= 6 else (
      f'{steps[0]}, {steps[1]}, ..., {steps[-1]} ({len(steps)} in all)')


def stored_splits(config, data, backbone, variables, train_reader, workdir: str):
  """(train, eval) `feature_store.StoredFeatures` of a streamed run (extracted or reused)."""
  mesh = parallel.make_mesh()
  train = feature_store.stored_features(config, data.spec, backbone, variables, train_reader,
                                        'train', mesh, workdir)
  evals = feature_store.stored_features(config, data.spec, backbone, variables, data.open('eval'),
                                        'eval', mesh, workdir)
  return train, evals


def streamed_knn_top1(config, data, backbone, variables, train_reader, workdir: str) -> float:
  """kNN top-1 (percent) over features streamed to WORKDIR/features (the split is too large)."""
  start = time.perf_counter()
  train, evals = stored_splits(config, data, backbone, variables, train_reader, workdir)
  if not evals.valid.any() or not train.valid.any():
    raise errors.DataError(f'No readable image in {"the eval" if train.valid.any() else "the train"} '
                           'split: every file failed to decode; check config.data.path.')
  queries = np.asarray(evals.features[evals.valid], np.float32)
  query_labels = evals.labels[evals.valid]
  scores = knn_scores_streamed(train, queries, max(train.num_classes, evals.num_classes),
                               config.eval.knn_k, config.eval.knn_temperature)
  correct = np.argmax(scores, axis=1) == query_labels
  top1 = float(100.0 * np.sum(correct) / correct.size)
  logging.info('kNN top-1 %.2f%% (k=%d, t=%g, %d train / %d eval images, streamed) in %.1f s.',
               top1, config.eval.knn_k, config.eval.knn_temperature, int(train.valid.sum()),
               len(query_labels), time.perf_counter() - start)
  return top1


def run_knn(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """kNN top-1 of the latest checkpoint (or random init) -> WORKDIR/eval.json.

  Returns:
    {'<prefix>knn_top1': percent, '<prefix>knn_step': step}.
  """
  label_check.require_labels(config, 'knn')
  backbone, variables, step, prefix = frozen.load_backbone(config, workdir)
  data = sources.from_config(config)
  train = streaming.open_split(data, 'train', evaluation=True)
  if train.stream:
    top1 = streamed_knn_top1(config, data, backbone, variables, train.data, workdir)
  else:  # The evaluator builds the same backbone from config.model.
    evaluator = KnnEvaluator(config, parallel.make_mesh(), train_ds=train.data,
                             eval_ds=data.load('eval'))
    top1 = evaluator(variables)
  scores = {f'{prefix}knn_top1': top1, f'{prefix}knn_step': step}
  results.write_results(workdir, scores)
  return scores
