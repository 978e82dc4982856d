"""The functional MoCo train state and its construction."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from moco_jax.methods import moco


@flax.struct.dataclass
class TrainState:
  """Everything a MoCo run carries from step to step; one pytree, checkpointed whole.

  Attributes:
    step: number of optimiser steps taken.
    query_params: parameters of the online (query) encoder; the only ones trained.
    query_batch_stats: BatchNorm running statistics of the query encoder.
    key_params: EMA of the query parameters (the momentum encoder); no gradient.
    key_batch_stats: BatchNorm running statistics of the key encoder.
    opt_state: optax state of the query parameters.
    queue: [K, dim] L2-normalised keys of past batches, the negatives.
    queue_ptr: index of the oldest queue row (the next to be overwritten).
    rng: base PRNG key; step s draws from fold_in(rng, s), so a resumed run
      draws exactly what an uninterrupted one would.
  """
  step: jax.Array
  query_params: Any
  query_batch_stats: Any
  key_params: Any
  key_batch_stats: Any
  opt_state: Any
  queue: jax.Array
  queue_ptr: jax.Array
  rng: jax.Array


def _split_rng(rng: jax.Array):
  """(init, queue, state) keys of a run seeded with `rng`."""
  return jax.random.split(rng, 3)


def run_rng(seed: int) -> jax.Array:
  """`TrainState.rng` of a run with this config.seed (it stays the same for the whole run)."""
  return _split_rng(jax.random.PRNGKey(seed))[2]


def step_rngs(rng: jax.Array, step) -> tuple:
  """(augmentation key, Shuffle BN key) of train step `step` of a run whose state.rng is `rng`.

  `train.augment_views` draws from them; `report` redraws a step's views with them.
  """
  return tuple(jax.random.split(jax.random.fold_in(rng, step)))


def initial_encoder_variables(rng: jax.Array, encoder, image_size: int):
  """(params, batch_stats) of the encoder at step 0 of a run seeded with `rng`.

  Shared by `create_train_state` and the random-init evaluation floor, so the
  floor is exactly the encoder that pretraining starts from.
  """
  dummy = jnp.zeros((2, image_size, image_size, 3), jnp.float32)
  variables = encoder.init(_split_rng(rng)[0], dummy, train=False)
  return variables['params'], variables['batch_stats']


def create_train_state(rng: jax.Array, encoder, tx: optax.GradientTransformation,
                       image_size: int, queue_size: int, embed_dim: int) -> TrainState:
  """Initialises the query encoder, copies it into the key encoder, fills the queue."""
  _, queue_rng, state_rng = _split_rng(rng)
  params, batch_stats = initial_encoder_variables(rng, encoder, image_size)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      query_params=params,
      query_batch_stats=batch_stats,
      # A copy, not an alias: the two trees evolve separately from step 1.
      key_params=jax.tree.map(jnp.copy, params),
      key_batch_stats=jax.tree.map(jnp.copy, batch_stats),
      opt_state=tx.init(params),
      queue=moco.init_queue(queue_rng, queue_size, embed_dim),
      queue_ptr=jnp.zeros((), jnp.int32),
      rng=state_rng,
  )
