"""InfoNCE over [positive, queue] logits and the key queue it reads."""

import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / ||x||, as torch.nn.functional.normalize (eps guards the zero vector)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


def moco_logits(queries: jax.Array, keys: jax.Array, queue: jax.Array,
                temperature: float) -> jax.Array:
  """Logits [N, 1 + K]: column 0 is q.k+, the rest q.queue^T, all divided by T.

  Computed in float32 whatever the network's dtype: with T = 0.07 and K = 65536
  bfloat16 logits would lose the small differences the loss is made of.
  """
  queries = queries.astype(jnp.float32)
  positive = jnp.sum(queries * keys.astype(jnp.float32), axis=-1, keepdims=True)
  negative = jnp.dot(queries, queue.astype(jnp.float32).T,
                     precision=jax.lax.Precision.HIGHEST)
  return jnp.concatenate([positive, negative], axis=1) / temperature


def infonce_loss(queries, keys, queue, temperature):
  """Mean InfoNCE: cross-entropy with label 0 over `moco_logits`.

  Returns:
    (loss, accuracy), accuracy being the fraction of queries whose positive key
    scores above every negative (a cheap health signal: it rises from ~0).
  """
  logits = moco_logits(queries, keys, queue, temperature)
  loss = jnp.mean(jax.nn.logsumexp(logits, axis=1) - logits[:, 0])
  accuracy = jnp.mean(jnp.argmax(logits, axis=1) == 0)
  return loss, accuracy


def enqueue(queue: jax.Array, pointer: jax.Array, keys: jax.Array):
  """Writes `keys` over the oldest entries of the FIFO `queue`, wrapping around.

  Any K >= len(keys) works (the official code asserts K % batch == 0): row i of
  `keys` goes to slot (pointer + i) mod K, and the pointer advances by len(keys).

  Returns:
    (new_queue, new_pointer).
  """
  size = queue.shape[0]
  count = keys.shape[0]
  slots = (pointer + jnp.arange(count)) % size
  queue = queue.at[slots].set(keys.astype(queue.dtype), unique_indices=True)
  return queue, (pointer + count) % size
