"""optim.name: the four optimisers and the write-up's lr schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from configs import writeup
from moco_jax.training import optim

PARAMS = {'dense': {'kernel': jnp.full((3, 2), 0.5), 'bias': jnp.full((2,), 0.5)}}
GRADS = {'dense': {'kernel': jnp.full((3, 2), 0.1), 'bias': jnp.full((2,), 0.1)}}


def _first_update(name, weight_decay=0.1, lr=0.01, grads=None):
  config = tiny.get_config()
  config.optim.name = name
  config.optim.weight_decay = weight_decay
  tx = optim.create_optimizer(config, optax.constant_schedule(lr))
  updates, _ = tx.update(GRADS if grads is None else grads, tx.init(PARAMS), PARAMS)
  return updates


def test_sgd_and_adam_add_l2_decay_to_the_gradient_like_torch():
  # torch SGD, first step: -lr (g + wd w) = -0.01 x (0.1 + 0.05).
  np.testing.assert_allclose(_first_update('sgd')['dense']['kernel'], -0.0015, rtol=1e-6)
  # torch Adam, first step: -lr x sign(g + wd w) (bias-corrected m / sqrt(v) = 1).
  np.testing.assert_allclose(_first_update('adam')['dense']['kernel'], -0.01, rtol=1e-5)
  adam = optax.adam(0.01)
  coupled = jax.tree.map(lambda g, w: g + 0.1 * w, GRADS, PARAMS)
  expected, _ = adam.update(coupled, adam.init(PARAMS), PARAMS)
  np.testing.assert_allclose(_first_update('adam')['dense']['kernel'],
                             expected['dense']['kernel'], rtol=1e-6)


def test_adamw_decouples_the_decay():
  # -lr x (m / sqrt(v) + wd w) = -0.01 x (1 + 0.05).
  np.testing.assert_allclose(_first_update('adamw')['dense']['kernel'], -0.0105, rtol=1e-5)


def test_lars_spares_biases_and_batchnorm():
  grads = {'dense': {'kernel': jnp.arange(6.0).reshape(3, 2) / 10, 'bias': GRADS['dense']['bias']}}
  updates = _first_update('lars', grads=grads)
  # A 1-d leaf: neither decay nor trust ratio, so plain momentum SGD.
  np.testing.assert_allclose(updates['dense']['bias'], -0.01 * 0.1, rtol=1e-6)
  # A kernel: decayed, then scaled by the trust ratio 0.001 x |w| / |g + wd w|.
  w, g = PARAMS['dense']['kernel'], grads['dense']['kernel'] + 0.1 * PARAMS['dense']['kernel']
  expected = -0.01 * 0.001 * jnp.linalg.norm(w) / jnp.linalg.norm(g) * g
  np.testing.assert_allclose(updates['dense']['kernel'], expected, rtol=1e-5)


def test_unknown_optimizer_is_named():
  config = tiny.get_config()
  config.optim.name = 'rmsprop'
  with pytest.raises(ValueError, match="config.optim.name='rmsprop'"):
    optim.create_optimizer(config, optax.constant_schedule(0.1))


@pytest.mark.parametrize('dataset', ['imagenette', 'imagewoof'])
def test_writeup_lr_goes_from_1e3_to_1e5(dataset):
  config = writeup.get_config(dataset)
  steps_per_epoch = 9025 // config.batch_size
  total = config.num_epochs * steps_per_epoch
  lr = optim.create_learning_rate_fn(config, steps_per_epoch, total)
  assert float(lr(0)) == pytest.approx(1e-3)
  assert float(lr(total - 1)) == pytest.approx(1e-5)
