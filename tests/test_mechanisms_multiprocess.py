"""end_to_end and memory_bank on 2 real processes x 4 CPU devices equal 1 process x 8 (issue 21).

What crosses processes is what each method adds to MoCo's step: end-to-end's
negatives are the keys of the global batch, all-gathered over both processes,
and its gradient comes back to the device that encoded each key through the
all-gather's transpose (a reduce-scatter over gloo); the memory bank's
proximal update writes the rows of the global batch, by their dataset indices,
all-gathered from both processes, so each process must feed the indices of
its own share of the batch and both must end with the same bank. A process
that fed another share's indices, or saw only its own keys, would leave a
checkpoint far from the one-process run; two correct runs differ only by the
order of their sums, which tests/rounding.py bounds (both sides in float64).

Both methods' 2-process runs (`tests/multiprocess_main.py`, through main.py's
flags, via test_multiprocess.TwoProcesses) start together and run while this
pytest process trains the references; every subprocess has a deadline and is
killed if anything fails.
"""

import json
import os
import time

import jax
import pytest

import helpers
import rounding
from moco_jax.core import parallel
from moco_jax import pretrain
from moco_jax.run import checkpoints
from moco_jax.training import optim
from moco_jax.training import step as step_lib
from tests import test_multiprocess

pytestmark = pytest.mark.slow  # Two-process clusters (pytest.ini).
METHODS = ('end_to_end', 'memory_bank')
STEPS = 4
NUM_NEGATIVES = 100
RUN_TIMEOUT_S = 240


def _flags(method):
  return [f'--config.method={method}', f'--config.num_train_steps={STEPS}',
          f'--config.checkpoint_every_steps={STEPS}', '--config.log_every_steps=1',
          f'--config.memory_bank.num_negatives={NUM_NEGATIVES}',
          f'--config.model.dtype={rounding.DTYPE}',
          f'--config.data.image_size={rounding.IMAGE_SIZE}']


def _config(method):
  """What `_flags(method)` makes of configs/tiny.py."""
  config = helpers.run_config(method, STEPS, NUM_NEGATIVES)
  config.model.dtype = rounding.DTYPE
  config.data.image_size = rounding.IMAGE_SIZE
  return config


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return [{'train_loss': r['train_loss']} for r in rows if 'train_loss' in r]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """{method: (2-process workdir, 1-process workdir, 1-process final state)}."""
  base = tmp_path_factory.mktemp('mechanisms_multiprocess')
  pairs, out = {}, {}
  try:
    for method in METHODS:
      pairs[method] = test_multiprocess.TwoProcesses(
          base / f'{method}_two', base, method, flags=_flags(method),
          # Nothing is killed here: a long heartbeat timeout, so that a loaded machine's
          # slow process is not declared dead.
          extra=['--heartbeat_timeout_seconds=120'])
    for method in METHODS:
      with rounding.precise(_config(method)) as config:
        workdir = base / f'{method}_one'
        out[method] = [base / f'{method}_two', workdir,
                       jax.device_get(pretrain.train_and_evaluate(config, str(workdir)))]
    for method, pair in pairs.items():
      deadline = pair.started + RUN_TIMEOUT_S
      rcs = [pair.wait(i, timeout=max(1.0, deadline - time.time())) for i in range(2)]
      assert rcs == [0, 0], pair.tails()
  finally:
    for pair in pairs.values():
      pair.kill()
  return out


def _restore(method, workdir):
  """Checkpoint STEPS of `workdir` restored on this process's 8 devices, in DTYPE."""
  config = _config(method)
  tx = optim.create_optimizer(config, optim.create_learning_rate_fn(config, 4, STEPS))
  setup = step_lib.make_step_setup(config, jax.device_count(), tx,
                                   num_examples=config.data.synthetic_examples)
  target = step_lib.init_state(config, setup, parallel.make_mesh())
  manager = checkpoints.create_manager(str(workdir), config)
  try:
    return jax.device_get(checkpoints.restore(manager, STEPS, target))
  finally:
    manager.close()


@pytest.mark.parametrize('method', METHODS)
def test_two_processes_give_the_one_process_checkpoint(runs, method):
  """Every leaf of the final state within float64 rounding; integers (step, RNG) exact.

  The memory bank's rows are leaves of the state (method_state): 4 steps of 64
  write every one of the 256 rows once, each from the process that held its image.
  """
  two_dir, one_dir, one = runs[method]
  with jax.enable_x64(rounding.DTYPE == 'float64'):
    two = _restore(method, two_dir)
  assert int(two.step) == int(one.step) == STEPS
  if method == 'memory_bank':
    config = _config(method)
    assert one.method_state.bank.shape == (config.data.synthetic_examples, config.model.embed_dim)
  rounding.assert_agree_to_rounding(two, one, f'{method}: 2 processes vs 1, step {STEPS}')
  rounding.assert_logged_agree(_losses(two_dir), _losses(one_dir))
  assert len(_losses(two_dir)) == STEPS
