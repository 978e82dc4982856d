"""`model.dtype='float64'` is float64 throughout: the numerical checks' premise.

The 1-vs-8-device and 1-vs-2-process comparisons (tests/rounding.py) bound the
difference of two float64 runs by float64 rounding; one float32 value inside
the step (the learning rate, MoCo v3's momentum, the ViT's position table)
would put float32 rounding into every update and void that bound. Each test
here fails if that value is float32 or rounded through float32.
"""

import math
import pathlib

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core
import numpy as np
import optax
import pytest

from moco_jax import models
from moco_jax.core import parallel
from moco_jax.methods import mocov3
from moco_jax.models import vit
from moco_jax.training import optim
from moco_jax.training import step as step_lib

import helpers

EPS64 = float(np.finfo(np.float64).eps)
# Crop geometry stays float32 by design: boxes are whole pixels and the
# resampling positions must equal the host-crop twin's (tests/test_streaming.py).
FLOAT32_BY_DESIGN = ('moco_jax/augmentation/image_ops.py',)
REPO = pathlib.Path(__file__).resolve().parents[1]


def _float32_sources(jaxpr, found):
  """'file:line (fn)' of every equation of `jaxpr` (and its sub-jaxprs) with a float32 result."""
  from jax._src import source_info_util  # pylint: disable=g-import-not-at-top
  for eqn in jaxpr.eqns:
    if any(getattr(getattr(v, 'aval', None), 'dtype', None) == jnp.float32 for v in eqn.outvars):
      found.add(source_info_util.summarize(eqn.source_info))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        if isinstance(sub, jax_core.ClosedJaxpr):
          _float32_sources(sub.jaxpr, found)
        elif isinstance(sub, jax_core.Jaxpr):
          _float32_sources(sub, found)
  return found


@pytest.mark.parametrize('variant,optimizer', [('', 'sgd'), ('', 'adam'), ('mocov3_vit', '')])
def test_a_float64_step_has_no_float32_value_outside_the_crop_geometry(variant, optimizer):
  """The whole sharded step traced (not compiled): its state, metrics and every value
  computed from the library, optax (schedule, Adam's bias correction) included, are float64."""
  config = helpers.tiny_config(variant, model__dtype='float64', batch_size=16,
                               moco__queue_size=32, optim__warmup_epochs=1.0)
  if optimizer:
    config.optim.name = optimizer
  with jax.enable_x64(True):
    mesh = parallel.make_mesh(jax.devices()[:2])
    lr = optim.create_learning_rate_fn(config, 4, 8)
    setup = step_lib.make_step_setup(config, 2, optim.create_optimizer(config, lr), total_steps=8)
    state = jax.eval_shape(lambda: step_lib.init_state(config, setup, mesh))
    step = step_lib.make_sharded_step(setup, lr, mesh)
    images = jax.ShapeDtypeStruct((16, 32, 32, 3), jnp.uint8)
    indices = jax.ShapeDtypeStruct((16,), jnp.int32)
    out = jax.eval_shape(step, state, images, indices)
    floats = [leaf.dtype for leaf in jax.tree.leaves(out) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    assert floats and set(floats) == {jnp.dtype(jnp.float64)}, set(floats)
    sources = _float32_sources(jax.make_jaxpr(step)(state, images, indices).jaxpr, set())
  outside = sorted(s for s in sources if s and not any(f in s for f in FLOAT32_BY_DESIGN))
  assert not outside, outside


def test_the_float64_learning_rate_is_the_schedule_in_float64():
  """Warm-up 3 steps then cosine: lr(1) = peak / 3, which float32 cannot hold."""
  config = helpers.tiny_config(model__dtype='float64', optim__warmup_epochs=1.0,
                               optim__base_lr=0.3)
  peak = 0.3 * config.batch_size / 256
  with jax.enable_x64(True):
    lr = optim.create_learning_rate_fn(config, steps_per_epoch=3, total_steps=10)
    for step in range(10):
      got = lr(jnp.asarray(step, jnp.int32))  # optax passes its int32 count.
      assert got.dtype == jnp.float64, got.dtype
      want = (peak * step / 3 if step < 3 else
              peak * 0.5 * (1 + math.cos(math.pi * (step - 3) / 7)))
      assert abs(float(got) - want) <= 4 * EPS64 * peak, (step, float(got), want)
  assert abs(float(np.float32(peak / 3)) - peak / 3) > 4 * EPS64 * peak  # The test can fail.


def test_float64_adam_is_the_textbook_update_in_float64():
  """Three Adam steps on float64 parameters against the formulas in Python floats."""
  config = helpers.tiny_config(model__dtype='float64', optim__name='adam',
                               optim__weight_decay=0.0, optim__warmup_epochs=0.0,
                               optim__schedule='constant', optim__base_lr=1 / 3)
  with jax.enable_x64(True):
    lr = optim.create_learning_rate_fn(config, 4, 8)
    tx = optim.create_optimizer(config, lr)
    params = {'w': jnp.asarray([0.1, -0.7], jnp.float64)}
    state = tx.init(params)
    grads = [np.array([1 / 3, 0.2]), np.array([-0.1, 1 / 7]), np.array([0.3, -1 / 9])]
    p, m, v = [0.1, -0.7], [0.0, 0.0], [0.0, 0.0]
    rate = (1 / 3) * config.batch_size / 256
    for t, g in enumerate(grads, start=1):
      updates, state = tx.update({'w': jnp.asarray(g)}, state, params)
      params = optax.apply_updates(params, updates)
      for i in range(2):
        m[i] = 0.9 * m[i] + 0.1 * g[i]
        v[i] = 0.999 * v[i] + 0.001 * g[i] ** 2
        p[i] -= rate * (m[i] / (1 - 0.9**t)) / (math.sqrt(v[i] / (1 - 0.999**t)) + 1e-8)
      assert params['w'].dtype == jnp.float64
      np.testing.assert_allclose(np.asarray(params['w']), p, rtol=0, atol=64 * EPS64)


def test_float64_momentum_schedule_is_float64():
  total, m0 = 7, 0.99
  with jax.enable_x64(True):
    for step in range(total + 1):
      got = mocov3.momentum_at(jnp.asarray(step, jnp.int32), total, m0, True, jnp.float64)
      want = 1 - (1 - m0) * (1 + math.cos(math.pi * step / total)) / 2
      assert got.dtype == jnp.float64 and abs(float(got) - want) <= 4 * EPS64, (step, got, want)
    assert mocov3.momentum_at(3, total, m0, False, jnp.float64).dtype == jnp.float64
  # float32 keeps float32 (the default path is unchanged).
  assert mocov3.momentum_at(3, total, m0, True).dtype == jnp.float32


def test_float64_vit_position_table_and_output_are_float64(monkeypatch):
  grid, dim = 8, 16
  with jax.enable_x64(True):
    table = models.sincos_position_embedding(grid, dim, dtype=np.float64)
    assert table.dtype == np.float64
    # Written differently: one Python float at a time.
    quarter = dim // 4
    for p in (1, 9, 37, grid * grid - 1):
      for j in range(quarter):
        omega = 1.0 / 10000.0**(j / quarter)
        want = [math.sin(p // grid * omega), math.cos(p // grid * omega),
                math.sin(p % grid * omega), math.cos(p % grid * omega)]
        got = table[1 + p, [j, quarter + j, 2 * quarter + j, 3 * quarter + j]]
        np.testing.assert_allclose(got, want, rtol=0, atol=8 * EPS64)
    assert not table[0].any()
    # The float32 table (the official code's) is unchanged: float32 throughout.
    assert models.sincos_position_embedding(grid, dim).dtype == np.float32
    # The model asks for the float64 table and returns float64 features.
    asked = []
    real = vit.sincos_position_embedding
    monkeypatch.setattr(vit, 'sincos_position_embedding',
                        lambda *a, **k: asked.append(k.get('dtype')) or real(*a, **k))
    config = helpers.tiny_config('mocov3_vit', model__dtype='float64')
    backbone = models.create_backbone(config.model)
    x = jnp.zeros((2, 32, 32, 3), jnp.float64)
    variables = backbone.init(jax.random.PRNGKey(0), x, train=False)
    out = backbone.apply(variables, x, train=False)
  assert np.dtype(asked[-1]) == np.float64, asked
  assert out.dtype == jnp.float64
