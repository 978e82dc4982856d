"""InfoNCE and the FIFO queue against formulas and slow references."""

import collections
import math

import jax.numpy as jnp
import numpy as np
import pytest

from moco_jax.methods import contrastive


def _unit(rng, shape):
  x = rng.standard_normal(shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _explicit_infonce(q, k, queue, t):
  """The seeds' exp/sum form: mean of -log(exp(q.k/t) / (exp(q.k/t) + sum exp(q.n/t)))."""
  pos = np.exp(np.sum(q * k, axis=1) / t)
  neg = np.sum(np.exp(q @ queue.T / t), axis=1)
  return np.mean(-np.log(pos / (pos + neg)))


@pytest.mark.parametrize('t', [0.07, 0.2, 1.0])
def test_infonce_equals_explicit_formula(t):
  rng = np.random.default_rng(0)
  q, k, queue = _unit(rng, (16, 8)), _unit(rng, (16, 8)), _unit(rng, (50, 8))
  loss, _ = contrastive.infonce_loss(jnp.asarray(q), jnp.asarray(k), jnp.asarray(queue), t)
  np.testing.assert_allclose(float(loss), _explicit_infonce(q, k, queue, t), rtol=1e-5)


def test_infonce_is_cross_entropy_with_label_zero():
  rng = np.random.default_rng(1)
  q, k, queue = _unit(rng, (8, 4)), _unit(rng, (8, 4)), _unit(rng, (20, 4))
  logits = np.asarray(contrastive.moco_logits(q, k, queue, 0.2))
  assert logits.shape == (8, 21)
  np.testing.assert_allclose(logits[:, 0], np.sum(q * k, 1) / 0.2, rtol=1e-5)
  np.testing.assert_allclose(logits[:, 1:], q @ queue.T / 0.2, rtol=1e-5, atol=1e-6)


def test_loss_at_init_is_near_log_k_plus_one():
  # Random unit vectors in 128-d are nearly orthogonal: every logit is ~0.
  rng = np.random.default_rng(2)
  size = 4096
  q, k, queue = _unit(rng, (64, 128)), _unit(rng, (64, 128)), _unit(rng, (size, 128))
  loss, _ = contrastive.infonce_loss(q, k, queue, 0.2)
  assert abs(float(loss) - math.log(size + 1)) < 0.05


def test_logits_are_float32_for_bfloat16_inputs():
  rng = np.random.default_rng(3)
  q = jnp.asarray(_unit(rng, (4, 8)), jnp.bfloat16)
  logits = contrastive.moco_logits(q, q, jnp.asarray(_unit(rng, (6, 8))), 0.2)
  assert logits.dtype == jnp.float32


def test_l2_normalize_matches_numpy():
  x = np.random.default_rng(4).standard_normal((5, 7))
  np.testing.assert_allclose(contrastive.l2_normalize(x), x / np.linalg.norm(x, axis=1, keepdims=True),
                             rtol=1e-6)


@pytest.mark.parametrize('size,batch', [(10, 3), (7, 7), (200, 64), (5, 1)])
def test_enqueue_is_fifo_with_wraparound(size, batch):
  """Against a deque of row ids: after many steps the queue holds the newest K rows."""
  queue = jnp.full((size, 1), -1.0)
  ptr = jnp.zeros((), jnp.int32)
  reference = collections.deque([-1.0] * size, maxlen=size)
  next_id = 0
  for _ in range(9):
    keys = jnp.arange(next_id, next_id + batch, dtype=jnp.float32)[:, None]
    next_id += batch
    queue, ptr = contrastive.enqueue(queue, ptr, keys)
    reference.extend(np.asarray(keys[:, 0]).tolist())
    assert int(ptr) == next_id % size
    # Reading the ring from the pointer gives the oldest -> newest order.
    ring = np.roll(np.asarray(queue[:, 0]), -int(ptr))
    np.testing.assert_array_equal(ring, np.asarray(reference))
