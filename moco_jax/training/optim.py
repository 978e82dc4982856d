"""Optimisers and learning-rate schedules (all optax), for pretraining and the probe.

One schedule factory serves both: a peak lr (already scaled by batch / 256),
an optional linear warm-up, then cosine decay, x0.1 steps or a constant.
"""

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import optax

from moco_jax import models
from moco_jax.core import checks

SCHEDULES = ('cosine', 'step', 'constant')


def learning_rate_schedule(peak: float, total_steps: int, *, kind: str = 'cosine',
                           warmup_steps: int = 0, boundaries: Iterable[int] = ()) -> Callable:
  """step -> lr: linear warm-up to `peak` over `warmup_steps`, then `kind`.

  Args:
    peak: the lr after warm-up.
    total_steps: length of the whole schedule (warm-up included).
    kind: 'cosine' (to 0 at total_steps), 'step' (x0.1 at each of `boundaries`,
      given in steps from 0) or 'constant'.
    warmup_steps: linear warm-up from 0; 0 = none.
    boundaries: steps of the 'step' schedule.
  """
  main_steps = max(total_steps - warmup_steps, 1)
  if kind == 'cosine':
    main = optax.cosine_decay_schedule(peak, main_steps)
  elif kind == 'step':
    main = optax.piecewise_constant_schedule(peak, {b - warmup_steps: 0.1 for b in boundaries})
  elif kind == 'constant':
    main = optax.constant_schedule(peak)
  else:
    raise ValueError(f'learning-rate schedule {kind!r} is not one of {list(SCHEDULES)}.')
  if warmup_steps == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), main],
                              [warmup_steps])


def create_learning_rate_fn(config, steps_per_epoch: int, total_steps: int) -> Callable:
  """Pretraining lr per step: base_lr x batch / 256, optional warm-up, then the schedule.

  With `model.dtype='float64'` the step count is made float64 before the
  schedule sees it: optax counts steps in int32, and an int32 count makes every
  schedule float32, which would round each update of a float64 run.
  """
  warmup = int(round(config.optim.warmup_epochs * steps_per_epoch))
  schedule = learning_rate_schedule(
      config.optim.base_lr * config.batch_size / 256, total_steps, kind=config.optim.schedule,
      warmup_steps=warmup,
      boundaries=[int(e * steps_per_epoch) for e in config.optim.step_epochs])
  if config.model.dtype != 'float64':
    return schedule
  return lambda step: schedule(jnp.asarray(step, jnp.float64))


OPTIMIZERS = ('sgd', 'adam', 'adamw', 'lars', 'lars_mocov3')


def check_config(optim_config) -> None:
  """ConfigError naming the first field of `config.optim` the optimiser or schedule cannot use."""
  check = lambda field, ok, rule, hint='': checks.check(optim_config, field, ok, rule, hint,
                                                         prefix='config.optim.')
  checks.choice(optim_config, 'name', OPTIMIZERS, prefix='config.optim.')
  checks.choice(optim_config, 'schedule', SCHEDULES, prefix='config.optim.')
  check('base_lr', lambda v: checks.number(v) and v > 0, 'must be > 0',
        'the lr for batch 256; MoCo v2: 0.03')
  check('weight_decay', lambda v: checks.number(v) and v >= 0, 'must be >= 0')
  check('momentum', lambda v: checks.number(v) and 0 <= v < 1, 'must be in [0, 1)')
  check('warmup_epochs', lambda v: checks.number(v) and v >= 0, 'must be >= 0', '0: no warm-up')
  check('step_epochs', checks.ascending, 'must be ascending epochs >= 0')


def create_optimizer(config, learning_rate_fn) -> optax.GradientTransformation:
  """The pretraining optimiser `config.optim.name`, with `config.optim.weight_decay`.

  sgd: torch.optim.SGD (decay added to the gradient before momentum; MoCo).
  adam: torch.optim.Adam (the same L2 decay in the gradient, betas 0.9 / 0.999).
  adamw: decoupled decay (optax.adamw: w -= lr x wd x w).
  lars: optax.lars with `optim.momentum`; biases and BatchNorm parameters (1-d)
    get neither decay nor the trust ratio, as in SimCLR / BYOL.
  lars_mocov3: moco-v3's `moco/optimizer.py` LARS: the same masks and trust
    0.001, but the momentum buffer sums the unscaled updates and the lr scales
    the buffer (p -= lr x mu), so it differs from `lars` whenever lr changes.
  Parameters the model freezes (ViT's `stop_grad_conv1` patch projection) get
  no update at all, as torch skips parameters without gradient.
  """
  tx = _base_optimizer(config, learning_rate_fn)
  if models.frozen_params_mask(config.model, {}) is None:
    return tx
  labels = lambda params: jax.tree.map(lambda f: 'frozen' if f else 'trained',
                                       models.frozen_params_mask(config.model, params))
  return optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)


def lars_mocov3(learning_rate_fn, weight_decay: float, momentum: float,
                trust_coefficient: float = 0.001) -> optax.GradientTransformation:
  """moco-v3's LARS: for ndim > 1, g += wd x p, g x= trust |p| / |g|; mu = m mu + g; p -= lr mu."""
  matrices = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
      optax.masked(optax.add_decayed_weights(weight_decay), matrices),
      optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient), matrices),
      optax.trace(decay=momentum),
      optax.scale_by_learning_rate(learning_rate_fn))


def _base_optimizer(config, learning_rate_fn) -> optax.GradientTransformation:
  """`create_optimizer` before the frozen parameters are masked out."""
  name = config.optim.get('name', 'sgd')
  decay = config.optim.weight_decay
  if name == 'sgd':
    return optax.chain(optax.add_decayed_weights(decay),
                       optax.sgd(learning_rate_fn, momentum=config.optim.momentum))
  if name == 'adam':
    return optax.chain(optax.add_decayed_weights(decay), optax.adam(learning_rate_fn))
  if name == 'adamw':
    return optax.adamw(learning_rate_fn, weight_decay=decay)
  if name == 'lars':
    matrices = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    return optax.lars(learning_rate_fn, weight_decay=decay, weight_decay_mask=matrices,
                      trust_ratio_mask=matrices, momentum=config.optim.momentum)
  if name == 'lars_mocov3':
    return lars_mocov3(learning_rate_fn, decay, config.optim.momentum)
  raise ValueError(f'config.optim.name={name!r} is not one of {list(OPTIMIZERS)}.')
