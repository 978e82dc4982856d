"""Linear evaluation: a linear classifier on frozen backbone features.

The MoCo protocol (frozen backbone without the head, BatchNorm in inference
mode, a new linear layer initialised N(0, 0.01) with zero bias, SGD momentum
0.9, weight decay 0, lr 30 x batch / 256, 100 epochs, lr x0.1 at 60 and 80),
with one documented simplification: features are computed ONCE, from the
deterministic eval view (resize + normalise, no crop or flip), for the train
and the eval split, and the classifier trains on those. The paper trains with
RandomResizedCrop + flip on the fly, which needs a backbone forward pass per
image per epoch (100x the compute); precomputed centre features are the cheap
variant used by most small-scale reports and typically land within a point or
two of it (usually slightly below: no augmentation, so a little overfitting).

The whole classifier training is one compiled function (epochs in a
fori_loop, steps in a scan over a per-epoch permutation), so 100 epochs over
50,000 features take seconds even on a CPU. Accuracies are percentages.
"""

import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from moco_jax import errors
from moco_jax import features
from moco_jax import optim
from moco_jax import parallel
from moco_jax import results
from moco_jax.data import sources


def linear_learning_rate_fn(eval_config, steps_per_epoch: int):
  """lr = linear_lr x batch / 256, stepped x0.1 at linear_step_epochs (or cosine)."""
  if eval_config.linear_schedule not in ('step', 'cosine'):
    raise errors.ConfigError(f"config.eval.linear_schedule={eval_config.linear_schedule!r}: expected "
                     "'step' (paper) or 'cosine'.")
  epochs = eval_config.linear_epochs
  return optim.learning_rate_schedule(
      eval_config.linear_lr * eval_config.linear_batch_size / 256,
      max(1, epochs * steps_per_epoch), kind=eval_config.linear_schedule,
      boundaries=[int(e * steps_per_epoch) for e in eval_config.linear_step_epochs
                  if 0 < e < epochs])


def init_classifier(rng: jax.Array, num_features: int, num_classes: int) -> dict:
  """Weights N(0, 0.01), zero bias, as the official main_lincls.py."""
  return {'kernel': 0.01 * jax.random.normal(rng, (num_features, num_classes), jnp.float32),
          'bias': jnp.zeros((num_classes,), jnp.float32)}


def logits_fn(params: dict, inputs: jax.Array) -> jax.Array:
  return inputs @ params['kernel'] + params['bias']


def standardizer(train_features: np.ndarray):
  """(mean, std) per feature of the train split (MAE-style BN without affine)."""
  mean = train_features.mean(axis=0)
  std = train_features.std(axis=0) + 1e-6
  return mean, std


def train_classifier(train_features: np.ndarray, train_labels: np.ndarray, num_classes: int,
                     eval_config, seed: int = 0):
  """Trains the linear classifier; returns (params, final-epoch mean train loss).

  The ragged tail of each epoch's permutation is dropped (each epoch still
  sees every example with probability ~1 - batch/N over a few epochs).
  """
  num, dim = train_features.shape
  batch = min(int(eval_config.linear_batch_size), num)
  steps_per_epoch = num // batch
  epochs = int(eval_config.linear_epochs)
  if epochs <= 0:
    raise errors.ConfigError(f'config.eval.linear_epochs={epochs} must be > 0 (paper: 100).')
  lr_fn = linear_learning_rate_fn(eval_config, steps_per_epoch)
  tx = optax.chain(optax.add_decayed_weights(eval_config.linear_weight_decay),
                   optax.sgd(lr_fn, momentum=0.9))
  rng = jax.random.PRNGKey(seed)
  init_rng, order_rng = jax.random.split(rng)
  params = init_classifier(init_rng, dim, num_classes)
  features = jnp.asarray(train_features, jnp.float32)
  labels = jnp.asarray(train_labels, jnp.int32)

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, x), y).mean()

  def step(carry, idx):
    p, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(p, features[idx], labels[idx])
    updates, opt_state = tx.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), loss

  def epoch(e, carry):
    p, opt_state, _ = carry
    perm = jax.random.permutation(jax.random.fold_in(order_rng, e), num)
    idx = perm[:steps_per_epoch * batch].reshape(steps_per_epoch, batch)
    (p, opt_state), losses = jax.lax.scan(step, (p, opt_state), idx)
    return p, opt_state, losses.mean()

  @jax.jit
  def fit(p):
    return jax.lax.fori_loop(0, epochs, epoch, (p, tx.init(p), jnp.zeros((), jnp.float32)))

  params, _, last_loss = fit(params)
  last_loss = float(last_loss)
  if not np.isfinite(last_loss):
    raise errors.NonFiniteError(
        f'The linear probe diverged (train loss {last_loss}): lower config.eval.linear_lr '
        f'(now {eval_config.linear_lr}) or set --config.eval.linear_standardize=True.')
  return jax.device_get(params), last_loss


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Percent of rows whose label is among the k largest logits."""
  k = min(k, logits.shape[1])
  top = np.argsort(-logits, axis=1)[:, :k]
  hits = np.any(top == np.asarray(labels)[:, None], axis=1)
  return float(100.0 * np.sum(hits) / hits.size)


def linear_probe(train_features, train_labels, eval_features, eval_labels, num_classes: int,
                 eval_config, seed: int = 0) -> dict:
  """Trains on train features, scores eval features: {'top1', 'top5', 'train_loss'}."""
  if eval_config.linear_standardize:
    mean, std = standardizer(train_features)
    train_features = (train_features - mean) / std
    eval_features = (eval_features - mean) / std
  params, last_loss = train_classifier(train_features, train_labels, num_classes, eval_config,
                                       seed)
  logits = np.asarray(logits_fn(params, jnp.asarray(eval_features, jnp.float32)))
  return {'top1': topk_accuracy(logits, eval_labels, 1),
          'top5': topk_accuracy(logits, eval_labels, 5),
          'train_loss': last_loss}


def run_linear_eval(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Linear probe of the latest checkpoint (or random init) -> WORKDIR/eval.json.

  Returns:
    {'<prefix>linear_top1', '<prefix>linear_top5', '<prefix>linear_step'}.
  """
  start = time.perf_counter()
  backbone, variables, step, prefix = features.load_backbone(config, workdir)
  mesh = parallel.make_mesh()
  train_ds = sources.load_split(config.data, 'train')
  eval_ds = sources.load_split(config.data, 'eval')
  num_classes = max(train_ds.num_classes, eval_ds.num_classes)
  # Unnormalised features, as the paper's probe (hence its lr of 30).
  train_features = features.extract_features(config, backbone, variables, train_ds, mesh,
                                        normalize=False)
  eval_features = features.extract_features(config, backbone, variables, eval_ds, mesh,
                                       normalize=False)
  logging.info('Extracted %s train and %s eval features in %.1f s.', train_features.shape,
               eval_features.shape, time.perf_counter() - start)
  scores = linear_probe(train_features, train_ds.labels, eval_features, eval_ds.labels,
                        num_classes, config.eval, seed=config.seed)
  logging.info('Linear probe (step %d%s): top-1 %.2f%%, top-5 %.2f%%, final train loss %.4f, '
               '%.1f s in all.', step, ', random init' if prefix else '', scores['top1'],
               scores['top5'], scores['train_loss'], time.perf_counter() - start)
  found = {f'{prefix}linear_top1': scores['top1'], f'{prefix}linear_top5': scores['top5'],
           f'{prefix}linear_step': step}
  results.write_results(workdir, found)
  return found
