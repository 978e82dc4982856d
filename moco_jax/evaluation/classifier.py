"""The linear classifier every probe trains: its initialisation, logits and top-k accuracy.

Shared by the protocols on stored features (`linear_probe`) and the paper's
protocol on augmented views (`linear_paper`), so both score the same model.
"""

import jax
import jax.numpy as jnp
import numpy as np


def init_classifier(rng: jax.Array, num_features: int, num_classes: int) -> dict:
  """Weights N(0, 0.01), zero bias, as the official main_lincls.py."""
  return {'kernel': 0.01 * jax.random.normal(rng, (num_features, num_classes), jnp.float32),
          'bias': jnp.zeros((num_classes,), jnp.float32)}


def logits_fn(params: dict, inputs: jax.Array) -> jax.Array:
  return inputs @ params['kernel'] + params['bias']


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Percent of rows whose label is among the k largest logits."""
  k = min(k, logits.shape[1])
  top = np.argsort(-logits, axis=1)[:, :k]
  hits = np.any(top == np.asarray(labels)[:, None], axis=1)
  return float(100.0 * np.sum(hits) / hits.size)
