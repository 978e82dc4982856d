"""The functional train state: one typed pytree, whatever the method."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a run carries from step to step; one pytree, checkpointed whole.

  Attributes:
    step: number of optimiser steps taken.
    params: parameters of the trained (online, query) encoder; every evaluation
      reads `params['backbone']`.
    batch_stats: its BatchNorm running statistics.
    opt_state: optax state of `params`.
    method_state: what the method carries beside them (MoCo: the momentum
      encoder and the queue; `moco_jax.methods`), () when nothing.
    rng: base PRNG key; step s draws from fold_in(rng, s), so a resumed run
      draws exactly what an uninterrupted one would.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  method_state: Any
  rng: jax.Array


def _split_rng(rng: jax.Array):
  """(init, method, state) keys of a run seeded with `rng`."""
  return jax.random.split(rng, 3)


def run_rng(seed: int) -> jax.Array:
  """`TrainState.rng` of a run with this config.seed (it stays the same for the whole run)."""
  return _split_rng(jax.random.PRNGKey(seed))[2]


def step_rngs(rng: jax.Array, step) -> tuple:
  """(augmentation key, method key) of train step `step` of a run whose state.rng is `rng`.

  `step.augment_views` draws from them; `report` redraws a step's views with them.
  """
  return tuple(jax.random.split(jax.random.fold_in(rng, step)))


def initial_encoder_variables(rng: jax.Array, encoder, image_size: int, channels: int = 3):
  """(params, batch_stats) of the encoder at step 0 of a run seeded with `rng`.

  `channels` (data.channels) is the input's: the first convolution takes them.

  Shared by `create_train_state` and the random-init evaluation floor, so the
  floor is exactly the encoder that pretraining starts from.
  """
  dummy = jnp.zeros((2, image_size, image_size, channels), jnp.float32)
  variables = encoder.init(_split_rng(rng)[0], dummy, train=False)
  return variables['params'], variables['batch_stats']


def create_train_state(rng: jax.Array, method, tx: optax.GradientTransformation,
                       image_size: int, channels: int = 3) -> TrainState:
  """Initialises the trained encoder, its optimiser state and the method's own state."""
  _, method_rng, state_rng = _split_rng(rng)
  params, batch_stats = initial_encoder_variables(rng, method.encoder, image_size, channels)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=tx.init(params),
      method_state=method.init_state(method_rng, params, batch_stats),
      rng=state_rng,
  )
