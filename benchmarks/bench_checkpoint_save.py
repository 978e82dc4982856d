"""The first checkpoint save of a run: Orbax's replica-parallel default against whole arrays.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
    python benchmarks/bench_checkpoint_save.py [--model=resnet50 --image_size=224]

With one process, `moco_jax/run/checkpoints.py` registers Orbax's ArrayHandler
with `use_replica_parallel=False`: each replicated array of the train state is
written whole, from its first device. Orbax's default on CPU and TPU splits
every replicated array into one slice per device, and each slice is a compiled
`slice_in_dim`. For each setting, in a fresh process (nothing compiled yet),
this builds the train state of `configs/tiny.py` (or the model given), saves it
twice and prints one JSON row: seconds of the first and second save (to the
end of the write), and how many programs XLA compiled during each. Both
settings write the same checkpoint: the row also says whether each restores
to the saved state exactly.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _one(replica_parallel: bool, model: str, image_size: int) -> dict:
  """Runs in a fresh process: the two saves of one setting."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from moco_jax.core import parallel  # pylint: disable=g-import-not-at-top
  from moco_jax.run import checkpoints  # pylint: disable=g-import-not-at-top
  from moco_jax.training import optim  # pylint: disable=g-import-not-at-top
  from moco_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top

  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **_: compiles.append(secs)
      if event == '/jax/core/compile/backend_compile_duration' else None)
  config = tiny.get_config()
  if model:
    config.model.name, config.model.stem, config.model.width = model, 'imagenet', 64
    config.model.embed_dim, config.data.image_size = 128, image_size
  tx = optim.create_optimizer(config, optim.create_learning_rate_fn(config, 4, 8))
  setup = step_lib.make_step_setup(config, jax.device_count(), tx, num_examples=256)
  state = step_lib.init_state(config, setup, parallel.make_mesh())
  jax.block_until_ready(state)
  workdir = tempfile.mkdtemp()
  manager = checkpoints.create_manager(workdir, config)
  if replica_parallel:  # Orbax's own default on CPU and TPU, after create_manager set ours.
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=True), override=True)
  row = {'replica_parallel': replica_parallel, 'devices': jax.device_count(),
         'model': config.model.name, 'image_size': config.data.image_size,
         'state_mb': round(sum(x.nbytes for x in jax.tree.leaves(state)) / 1e6, 1)}
  for step in (1, 2):
    before, start = len(compiles), time.perf_counter()
    checkpoints.save(manager, step, state)
    manager.wait_until_finished()
    row[f'save_{step}_s'] = round(time.perf_counter() - start, 3)
    row[f'save_{step}_compiles'] = len(compiles) - before
  restored = checkpoints.restore(manager, 2, state)
  row['restores_exactly'] = all(
      np.array_equal(np.asarray(a), np.asarray(b))
      for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)))
  manager.close()
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='', help='e.g. resnet50 (default: configs/tiny.py)')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--one', choices=['whole', 'replica_parallel'], help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    print(json.dumps(_one(args.one == 'replica_parallel', args.model, args.image_size)))
    return
  for setting in ('replica_parallel', 'whole'):
    out = subprocess.run([sys.executable, __file__, f'--one={setting}', f'--model={args.model}',
                          f'--image_size={args.image_size}'], cwd=ROOT, check=True,
                         capture_output=True, text=True)
    print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == '__main__':
  main()
