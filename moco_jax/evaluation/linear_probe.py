"""Linear evaluation: a linear classifier on frozen backbone features.

Two protocols (`config.eval.linear_protocol`), with their own eval.json keys so
both can live in one workdir:

* 'standardized' (the default; keys `linear_top1`, `linear_top5`, `linear_lr`):
  each feature dimension is standardised with the train split's mean and std
  (BatchNorm without affine in front of the classifier, as MoCo v3 and MAE
  do), the lr is picked from `eval.linear_lrs` by top-1 on a held-out tenth
  of the TRAIN split (`eval.linear_holdout`; the eval split is never used to
  choose anything), then the classifier is retrained on the whole train split
  with that lr and scored on the eval split. This works out of the box for any
  encoder width: the raw protocol's lr 30 suits a ResNet-50's features and
  diverges on small encoders.
* 'raw' (keys `linear_raw_top1`, `linear_raw_top5`): the MoCo paper's protocol,
  raw features, lr `eval.linear_lr` (30) x batch / 256, no sweep.

Common to both, as the official main_lincls.py: frozen backbone without the
head, BatchNorm in inference mode, a new linear layer N(0, 0.01) with zero
bias, SGD momentum 0.9, weight decay `eval.linear_weight_decay` (0), 100
epochs, lr x0.1 at epochs 60 and 80. One documented simplification: features
are computed ONCE, from the deterministic eval view (resize + normalise, no
crop or flip), for the train and the eval split, and the classifier trains on
those. The paper trains with RandomResizedCrop + flip on the fly (a backbone
forward pass per image per epoch, 100x the compute); precomputed centre
features are the cheap variant most small-scale reports use and typically
land within a point or two of it (usually slightly below).

The whole classifier training is one compiled function (epochs in a scan,
steps in a scan over a per-epoch permutation, the lrs of the sweep side by
side under vmap), so a sweep of 100 epochs over 50,000 features takes
seconds on a CPU. A final train loss that is not finite, above log(classes)
(worse than a uniform guess) or above its first
epoch's is reported as divergence. Accuracies are percentages.
"""

import math
import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from moco_jax.core import checks
from moco_jax.core import errors
from moco_jax.core import parallel
from moco_jax.data import sources
from moco_jax.data import streaming
from moco_jax.evaluation import classifier
from moco_jax.evaluation import feature_store
from moco_jax.evaluation import features
from moco_jax.evaluation import frozen
from moco_jax.evaluation import label_check
from moco_jax.evaluation import knn
from moco_jax.evaluation import linear_paper
from moco_jax.evaluation import results
from moco_jax.training import optim

PROTOCOLS = ('standardized', 'raw')  # And 'paper' (linear_paper.py; evaluation/checks.py).
SCHEDULES = ('step', 'cosine')  # eval.linear_schedule: step is the paper's.


def linear_learning_rate_fn(eval_config, steps_per_epoch: int, lr=None):
  """lr x batch / 256 (lr defaults to eval.linear_lr), stepped x0.1 at linear_step_epochs.

  `lr` may be a traced value (the sweep trains several lrs in one program).
  """
  checks.choice(eval_config, 'linear_schedule', SCHEDULES, prefix='config.eval.')
  epochs = eval_config.linear_epochs
  unit = optim.learning_rate_schedule(
      eval_config.linear_batch_size / 256, max(1, epochs * steps_per_epoch),
      kind=eval_config.linear_schedule,
      boundaries=[int(e * steps_per_epoch) for e in eval_config.linear_step_epochs
                  if 0 < e < epochs])
  lr = eval_config.linear_lr if lr is None else lr
  return lambda step: lr * unit(step)


def standardizer(train_features: np.ndarray):
  """(mean, std) per feature of the train split (BatchNorm without affine, MAE-style)."""
  mean = train_features.mean(axis=0)
  std = train_features.std(axis=0) + 1e-6
  return mean, std


def train_classifiers(train_features: np.ndarray, train_labels: np.ndarray, num_classes: int,
                      eval_config, lrs, seed: int = 0):
  """Trains one linear classifier per lr in `lrs` (same init and data order).

  The ragged tail of each epoch's permutation is dropped.

  Returns:
    (params with a leading [len(lrs)] axis, per-epoch mean train losses
    [len(lrs), epochs]), as host arrays.
  """
  num, dim = train_features.shape
  batch = min(int(eval_config.linear_batch_size), num)
  steps_per_epoch = num // batch
  epochs = int(eval_config.linear_epochs)
  if epochs <= 0:
    raise errors.ConfigError(f'config.eval.linear_epochs={epochs} must be > 0 (paper: 100).')
  init_rng, order_rng = jax.random.split(jax.random.PRNGKey(seed))
  params0 = classifier.init_classifier(init_rng, dim, num_classes)
  feats = jnp.asarray(train_features, jnp.float32)
  labels = jnp.asarray(train_labels, jnp.int32)

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(classifier.logits_fn(p, x), y).mean()

  def fit_one(lr):
    tx = optax.chain(optax.add_decayed_weights(eval_config.linear_weight_decay),
                     optax.sgd(linear_learning_rate_fn(eval_config, steps_per_epoch, lr),
                               momentum=0.9))

    def step(carry, idx):
      p, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(p, feats[idx], labels[idx])
      updates, opt_state = tx.update(grads, opt_state, p)
      return (optax.apply_updates(p, updates), opt_state), loss

    def epoch(carry, e):
      perm = jax.random.permutation(jax.random.fold_in(order_rng, e), num)
      idx = perm[:steps_per_epoch * batch].reshape(steps_per_epoch, batch)
      carry, losses = jax.lax.scan(step, carry, idx)
      return carry, losses.mean()

    (p, _), losses = jax.lax.scan(epoch, (params0, tx.init(params0)), jnp.arange(epochs))
    return p, losses

  params, losses = jax.jit(jax.vmap(fit_one))(jnp.asarray(lrs, jnp.float32))
  return jax.device_get(params), np.asarray(losses)


def train_classifier(train_features, train_labels, num_classes: int, eval_config, seed: int = 0,
                     lr=None):
  """One classifier at `lr` (default eval.linear_lr): (params, per-epoch train losses)."""
  lr = eval_config.linear_lr if lr is None else lr
  params, losses = train_classifiers(train_features, train_labels, num_classes, eval_config,
                                     [lr], seed)
  return jax.tree.map(lambda x: x[0], params), losses[0]


def divergence(losses: np.ndarray, num_classes: int) -> str:
  """Why a probe's per-epoch train losses look diverged ('' if they do not)."""
  last = float(losses[-1])
  if not np.isfinite(last):
    return f'final train loss {last}'
  if last > math.log(max(num_classes, 2)):
    return (f'final train loss {last:.3f} is above log({num_classes}) = '
            f'{math.log(max(num_classes, 2)):.3f}, worse than a uniform guess')
  if len(losses) > 1 and last > float(losses[0]):
    return f'train loss rose from {float(losses[0]):.3f} (epoch 1) to {last:.3f}'
  return ''


def _standardize(fit_features, *others):
  mean, std = standardizer(fit_features)
  return [(x - mean) / std for x in (fit_features,) + others]


def holdout_split(num: int, fraction: float, seed: int):
  """(fit indices, held-out indices): a random `fraction` of range(num) held out."""
  if not 0 < fraction < 1:
    raise errors.ConfigError(f'config.eval.linear_holdout={fraction} must be in (0, 1) (default 0.1).')
  held = min(max(1, int(round(num * fraction))), num - 1)
  perm = np.random.default_rng(seed).permutation(num)
  return np.sort(perm[held:]), np.sort(perm[:held])


def select_lr(train_features, train_labels, num_classes: int, eval_config, seed: int = 0):
  """The lr of eval.linear_lrs with the best top-1 on a held-out part of the train split.

  Returns:
    (lr, {lr: held-out top-1 percent, NaN when its training diverged}).
  """
  lrs = [float(lr) for lr in eval_config.linear_lrs]
  if not lrs:
    raise errors.ConfigError('config.eval.linear_lrs is empty: give at least one lr, e.g. (0.1,).')
  if len(lrs) == 1:
    return lrs[0], {}
  fit, held = holdout_split(len(train_labels), eval_config.linear_holdout, seed)
  fit_x, held_x = _standardize(train_features[fit], train_features[held])
  params, losses = train_classifiers(fit_x, train_labels[fit], num_classes, eval_config, lrs,
                                     seed)
  scores = {}
  for i, lr in enumerate(lrs):
    p = jax.tree.map(lambda x, i=i: x[i], params)
    if not np.isfinite(losses[i][-1]):
      scores[lr] = float('nan')
      continue
    logits = np.asarray(classifier.logits_fn(p, jnp.asarray(held_x, jnp.float32)))
    scores[lr] = classifier.topk_accuracy(logits, train_labels[held], 1)
  finite = {lr: s for lr, s in scores.items() if np.isfinite(s)}
  if not finite:
    raise errors.NonFiniteError(f'Every lr of config.eval.linear_lrs={tuple(lrs)} diverged: try '
                             'smaller ones.')
  best = max(finite, key=lambda lr: (finite[lr], -lr))  # Ties: the smaller lr.
  logging.info('Linear probe lr sweep (top-1 on %d held-out train images, trained on %d): %s; '
               'picked lr %g.', len(held), len(fit),
               ', '.join(f'lr {lr:g}: {s:.2f}' for lr, s in scores.items()), best)
  return best, scores


def linear_probe(train_features, train_labels, eval_features, eval_labels, num_classes: int,
                 eval_config, seed: int = 0) -> dict:
  """Trains on train features, scores eval features, as `eval_config.linear_protocol` says.

  Returns:
    {'top1', 'top5', 'train_loss', 'lr', 'diverged' (reason or '')}.
  """
  protocol = eval_config.get('linear_protocol', 'standardized')
  checks.choice(eval_config, 'linear_protocol', PROTOCOLS, prefix='config.eval.')
  train_labels = np.asarray(train_labels)
  if protocol == 'standardized':
    lr, _ = select_lr(train_features, train_labels, num_classes, eval_config, seed)
    train_features, eval_features = _standardize(train_features, eval_features)
  else:
    lr = float(eval_config.linear_lr)
  params, losses = train_classifier(train_features, train_labels, num_classes, eval_config, seed,
                                    lr=lr)
  reason = divergence(losses, num_classes)
  if reason:
    logging.warning('The linear probe (%s protocol, lr %g) diverged: %s. Its accuracy understates '
                    'the features: %s', protocol, lr, reason,
                    'use smaller config.eval.linear_lrs.' if protocol == 'standardized' else
                    'lower config.eval.linear_lr or use the default standardized protocol.')
  if not np.isfinite(losses[-1]):
    raise errors.NonFiniteError(f'The linear probe diverged ({reason}).')
  logits = np.asarray(classifier.logits_fn(params, jnp.asarray(eval_features, jnp.float32)))
  return {'top1': classifier.topk_accuracy(logits, eval_labels, 1),
          'top5': classifier.topk_accuracy(logits, eval_labels, 5),
          'train_loss': float(losses[-1]), 'lr': lr, 'diverged': reason}


def result_keys(protocol: str, prefix: str = '') -> dict:
  """eval.json key of each result of `protocol`: linear_* (standardized), linear_raw_* (raw)."""
  stem = f'{prefix}linear_' if protocol == 'standardized' else f'{prefix}linear_raw_'
  return {'top1': stem + 'top1', 'top5': stem + 'top5', 'lr': stem + 'lr', 'step': stem + 'step'}


def _split_features(config, backbone, variables, workdir: str):
  """((train features, labels), (eval features, labels), classes): raw float32 features.

  A train split larger than `data.max_in_memory_gb` is streamed into
  WORKDIR/features (`feature_store`, float16, reused by --mode=knn) and copied
  block by block to the device without its unreadable images (a float32 jax
  array: the probe trains on the device and the host holds one block);
  otherwise both splits are decoded into memory as before.
  """
  data = sources.from_config(config)
  train = streaming.open_split(data, 'train', evaluation=True)
  if train.stream:
    train, evals = knn.stored_splits(config, data, backbone, variables, train.data, workdir)
    pairs = [(feature_store.to_device(s), s.labels[s.valid]) for s in (train, evals)]
    return pairs[0], pairs[1], max(train.num_classes, evals.num_classes)
  mesh = parallel.make_mesh()
  pairs = []
  for ds in (train.data, data.load('eval')):
    pairs.append((features.extract_features(config, backbone, variables, ds, mesh,
                                            normalize=False), ds.labels, ds.num_classes))
  return pairs[0][:2], pairs[1][:2], max(pairs[0][2], pairs[1][2])


def run_linear_eval(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Linear probe of the latest checkpoint (or random init) -> WORKDIR/eval.json.

  Returns:
    {'<prefix>linear_top1', ..._top5, ..._lr, ..._step} (standardized protocol)
    or the same with `linear_raw_` (raw protocol); prefix 'random_init_' for
    the floor. 'paper': `linear_paper.run_paper_linear_eval`'s keys.
  """
  label_check.require_labels(config, 'linear_eval')
  protocol = config.eval.get('linear_protocol', 'standardized')
  if protocol == 'paper':  # Its own module: augmented views every epoch.
    return linear_paper.run_paper_linear_eval(config, workdir)
  start = time.perf_counter()
  backbone, variables, step, prefix = frozen.load_backbone(config, workdir)
  # Unnormalised features: the standardized protocol standardises them itself.
  (train_features, train_labels), (eval_features, eval_labels), num_classes = _split_features(
      config, backbone, variables, workdir)
  logging.info('Extracted %s train and %s eval features in %.1f s.', train_features.shape,
               eval_features.shape, time.perf_counter() - start)
  scores = linear_probe(train_features, train_labels, eval_features, eval_labels,
                        num_classes, config.eval, seed=config.seed)
  logging.info('Linear probe (%s protocol, step %d%s, lr %g): top-1 %.2f%%, top-5 %.2f%%, '
               'final train loss %.4f, %.1f s in all.', protocol, step,
               ', random init' if prefix else '', scores['lr'], scores['top1'], scores['top5'],
               scores['train_loss'], time.perf_counter() - start)
  keys = result_keys(protocol, prefix)
  found = {keys['top1']: scores['top1'], keys['top5']: scores['top5'], keys['lr']: scores['lr'],
           keys['step']: step}
  results.write_results(workdir, found)
  return found
