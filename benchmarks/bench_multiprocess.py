"""What crossing processes costs: the train step on 2 processes x 4 CPU devices vs 1 x 8.

  python benchmarks/bench_multiprocess.py --steps=10 --rounds=3
  python benchmarks/bench_multiprocess.py --image_size=64 --width=16 --batch=128

Both layouts form the same 8-device mesh and run the same step
(`step.make_sharded_step`, the trainer's function) on the same global batch;
only the path of the collectives differs. With 1 process, the Shuffle-BN
all-gathers, the gradient/BatchNorm pmeans and the queue's all-gather stay in
one address space; with 2 processes (`jax.distributed` on 127.0.0.1, gloo over
TCP) every one of them crosses a socket. Besides the whole step, two programs
time those collectives alone on the same mesh: the pmean of a gradient-sized
tree (the query encoder's params), once as `lax.pmean` of the tree (one
all-reduce per array) and once raveled into one array as the step does
(`parallel.pmean_packed`), and the all-gather of the uint8 batch.

Each round launches both layouts as fresh processes, in alternating order, so
that a shared machine's changing load hits both alike; per-step times are the
median of `--steps` timed steps after `--warmup`, and the table reports the
median over rounds. The batch stays on the devices (no input pipeline in the
loop). CPU only: on GPUs and TPUs the collectives take NCCL/ICI instead.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

DEVICES = 8


def _worker(args):
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_num_cpu_devices', DEVICES // args.num_processes)
  from moco_jax.run import distributed  # pylint: disable=g-import-not-at-top
  if args.num_processes > 1:
    distributed.initialize(f'127.0.0.1:{args.port}', args.num_processes, args.process_id,
                           heartbeat_timeout_seconds=60, initialization_timeout=120)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.flatten_util import ravel_pytree  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from moco_jax.core import parallel  # pylint: disable=g-import-not-at-top
  from moco_jax.training import optim  # pylint: disable=g-import-not-at-top
  from moco_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top

  config = tiny.get_config()
  config.batch_size = args.batch
  config.data.image_size = args.image_size
  config.model.width = args.width
  lr = optim.create_learning_rate_fn(config, 100, 100)
  tx = optim.create_optimizer(config, lr)
  mesh = parallel.make_mesh()
  setup = step_lib.make_step_setup(config, jax.device_count(), tx)
  state = step_lib.init_state(config, setup, mesh)
  step = step_lib.make_sharded_step(setup, lr, mesh)
  local = args.batch // args.num_processes
  rng = np.random.default_rng(args.process_id)
  images = parallel.shard_batch(
      rng.integers(0, 256, (local, args.image_size, args.image_size, 3), dtype=np.uint8), mesh)
  indices = parallel.shard_batch(
      np.arange(local, dtype=np.int32) + args.process_id * local, mesh)

  def median_time(fn, n):
    for _ in range(args.warmup):
      jax.block_until_ready(fn())
    times = []
    for _ in range(n):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  holder = {'state': state}

  def one_step():
    holder['state'], metrics = step(holder['state'], images, indices)
    return metrics

  step_s = median_time(one_step, args.steps)

  grads = holder['state'].params  # Gradient-shaped.
  pmean = jax.jit(jax.shard_map(lambda g: jax.lax.pmean(g, parallel.AXIS), mesh=mesh,
                                in_specs=P(), out_specs=P(), check_vma=False))
  pmean_s = median_time(lambda: pmean(grads), args.steps)

  def flat_pmean(g):
    flat, unravel = ravel_pytree(g)
    return unravel(jax.lax.pmean(flat, parallel.AXIS))

  pmean_one = jax.jit(jax.shard_map(flat_pmean, mesh=mesh, in_specs=P(), out_specs=P(),
                                    check_vma=False))
  pmean_one_s = median_time(lambda: pmean_one(grads), args.steps)
  gather = jax.jit(jax.shard_map(lambda x: jax.lax.all_gather(x, parallel.AXIS, tiled=True),
                                 mesh=mesh, in_specs=P(parallel.AXIS), out_specs=P(),
                                 check_vma=False))
  gather_s = median_time(lambda: gather(images), args.steps)
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(grads))
  if jax.process_index() == 0:
    with open(args.out, 'w') as f:
      json.dump({'step_s': step_s, 'pmean_s': pmean_s, 'pmean_one_s': pmean_one_s,
                 'gather_s': gather_s, 'leaves': len(jax.tree.leaves(grads)),
                 'params': params, 'devices': jax.device_count(),
                 'processes': jax.process_count()}, f)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _launch(num_processes: int, args, timeout: int = 600) -> dict:
  out = tempfile.mktemp(suffix='.json')
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COORDINATOR_BIND_ADDRESS=f'127.0.0.1:{port}')
  env.pop('XLA_FLAGS', None)
  procs = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), '--worker', f'--process_id={i}',
       f'--num_processes={num_processes}', f'--port={port}', f'--out={out}',
       f'--steps={args.steps}', f'--warmup={args.warmup}', f'--batch={args.batch}',
       f'--image_size={args.image_size}', f'--width={args.width}'],
      cwd=_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(num_processes)]
  try:
    for p in procs:
      _, err = p.communicate(timeout=timeout)
      if p.returncode:
        raise RuntimeError(f'worker failed ({p.returncode}):\n{err[-3000:]}')
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  with open(out) as f:
    result = json.load(f)
  os.remove(out)
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--image_size', type=int, default=32)
  parser.add_argument('--width', type=int, default=8)
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--process_id', type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument('--num_processes', type=int, default=1, help=argparse.SUPPRESS)
  parser.add_argument('--port', type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument('--out', default='', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    _worker(args)
    return

  runs = {1: [], 2: []}
  for r in range(args.rounds):
    for n in ((1, 2) if r % 2 == 0 else (2, 1)):
      runs[n].append(_launch(n, args))
      print(f'round {r + 1}, {n} process(es): ' + ', '.join(
          f'{k} {v * 1e3:.1f} ms' for k, v in runs[n][-1].items() if k.endswith('_s')),
            flush=True)

  def med(n, key):
    return statistics.median(x[key] for x in runs[n]) * 1e3

  load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
  print(f'\nresnet_tiny width {args.width}, batch {args.batch}, {args.image_size} px, '
        f'{runs[1][0]["params"]:,} params, {DEVICES} CPU devices, {os.cpu_count()} cores, '
        f'load {load:.1f}; median of {args.rounds} rounds x {args.steps} steps\n')
  print('| | 1 process x 8 devices | 2 processes x 4 devices | 2-process cost |')
  print('| --- | --- | --- | --- |')
  leaves = runs[1][0]['leaves']
  for key, name in (('step_s', 'train step'),
                    ('pmean_s', f'pmean of the gradients, one all-reduce per array ({leaves})'),
                    ('pmean_one_s', 'the same raveled into one array (parallel.pmean_packed)'),
                    ('gather_s', 'all-gather of the uint8 batch')):
    one, two = med(1, key), med(2, key)
    print(f'| {name} | {one:.1f} ms | {two:.1f} ms | {two - one:+.1f} ms ({two / one:.2f}x) |')


if __name__ == '__main__':
  main()
