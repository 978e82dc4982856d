"""Comparing two runs that differ only in summation order, with a bound that holds on any CPU.

One step on 1 device vs 8, or 1 process vs 2, is the same computation with its
sums split differently (a psum of 8 partial sums instead of one sum; gloo adds
4 + 4 and then 2). Each reduction then rounds differently, by a few units of
roundoff u of its sum of magnitudes, and everything after carries the
difference on, multiplied by the computation's error growth G (the network's
conditioning, BatchNorm's division by a small std, the SGD steps). Normwise, per
array:

    max |a - b|  ~  G * u * max(max |b|, 1).

The 1 is the scale of what the sums add up (normalised activations, unit
features, O(1) logits): a result that cancels to ~0 (the batch mean of
BatchNorm-ed features) or a parameter still near its zero init (a bias after
two steps; AdamW turns the key bias's gradient, zero up to rounding, into
updates of ~1e-9 lr) carries the absolute rounding of those inputs.

G belongs to the computation, not to the CPU: another CPU's vector width or
thread count changes *which* roundings happen, not how they grow. It can depend
on the precision where the step is piecewise (ReLU, max-pool: a difference of u
can move a value across a kink, and the gradient by that value's share); the
coarser float32 makes that far likelier. These tests therefore run both sides
in float64 (u = 1.1e-16; the whole state is float64, `step.init_state` with
`model.dtype='float64'`) and allow
G <= 1e7 (`RTOL` = 1e-9). Measured in float64 (`pytest -s`, which prints G per
comparison) G is 5 to 156; in float32 (`MOCO_ROUNDING_DTYPE=float32`) 2 to 97,
except end-to-end across 2 processes, 4.75e4, where two one-process float32 runs
that differ only in `--xla_cpu_max_isa` also reach 1.2e4-1.8e4 by step 2
(docs/equivalence.md): the bound has 200x room over the largest G seen. A real
fault (a missing all-reduce or all-gather, per-device statistics, a wrong shard)
moves arrays by 1e-4 of their size or more, 1e5 times the bound.
"""

import contextlib
import os

import jax
import numpy as np

DTYPE = os.environ.get('MOCO_ROUNDING_DTYPE', 'float64')
# G <= 1e7 allowed; in float64 that is 1e7 * 1.1e-16 = 1.1e-9.
MAX_GROWTH = 1e7
RTOL = MAX_GROWTH * np.finfo(np.float64).eps / 2
# The image side of the float64 runs. XLA:CPU runs float64 convolutions as loops it generates
# (float32 ones call a library), and the suite leaves them unoptimised (tests/conftest.py): a
# tiny-ResNet float64 step is several times cheaper at 8 px than at 16 (docs/architecture.md,
# "Testing").
# What these runs check (sums split across devices or processes) does not depend on the size.
IMAGE_SIZE = 8


@contextlib.contextmanager
def precise(config):
  """Sets `config.model.dtype` to DTYPE and enables float64 in JAX for the block."""
  config.model.dtype = DTYPE
  with jax.enable_x64(DTYPE == 'float64'):
    yield config


def _unit_roundoff(dtype) -> float:
  return float(np.finfo(dtype).eps) / 2


def growth(actual, desired) -> float:
  """G of one array: max |a - b| / (u * max(max |b|, 1)), u of the arrays' dtype."""
  actual, desired = np.asarray(actual), np.asarray(desired)
  if not desired.size:
    return 0.0
  scale = max(float(np.max(np.abs(desired))), 1.0)
  diff = float(np.max(np.abs(actual.astype(np.float64) - desired)))
  return diff / (_unit_roundoff(desired.dtype) * scale)


def assert_agree_to_rounding(actual, desired, name: str = ''):
  """Trees equal in structure; integer leaves exactly; float leaves G <= MAX_GROWTH.

  Under float32 (MOCO_ROUNDING_DTYPE=float32, to measure G) only prints.
  Returns the largest G.
  """
  leaves_a, tree_a = jax.tree.flatten(actual)
  leaves_d, tree_d = jax.tree.flatten(desired)
  assert tree_a == tree_d, (name, tree_a, tree_d)
  worst, where = 0.0, ''
  for i, (a, d) in enumerate(zip(leaves_a, leaves_d)):
    a, d = np.asarray(a), np.asarray(d)
    assert a.shape == d.shape and a.dtype == d.dtype, (name, i, a.shape, d.shape, a.dtype, d.dtype)
    if not np.issubdtype(d.dtype, np.floating):
      np.testing.assert_array_equal(a, d, err_msg=f'{name} leaf {i}')
      continue
    if DTYPE == 'float64':
      assert d.dtype == np.float64, f'{name} leaf {i} is {d.dtype}: not run in float64'
    g = growth(a, d)
    if g > worst:
      worst, where = g, f'leaf {i} {d.shape}'
    if DTYPE == 'float64':
      assert np.all(np.isfinite(a)) and g <= MAX_GROWTH, (
          f'{name} leaf {i} {d.shape}: max |a - b| = {g:.3g} u * max(max |b|, 1) > '
          f'{MAX_GROWTH:.0e} u')
  print(f'[rounding] {name}: G = {worst:.3g} ({DTYPE}, at {where or "-"})')
  return worst


def assert_logged_agree(actual_metrics, desired_metrics):
  """Step metrics, computed in DTYPE and logged as float32: at most 1 float32 ulp apart.

  Two float64 values within RTOL of each other round to the same float32 or to
  neighbours. (Only printed under MOCO_ROUNDING_DTYPE=float32.)
  """
  for a, d in zip(actual_metrics, desired_metrics):
    for key in d:
      if DTYPE == 'float64':
        np.testing.assert_allclose(a[key], d[key], rtol=np.finfo(np.float32).eps, err_msg=key)
