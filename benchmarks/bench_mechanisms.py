"""MoCo v2 Table 3 as XLA compile-time proxies: memory and FLOPs of the three mechanisms' step.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu nice -n 10 \
      python benchmarks/bench_mechanisms.py --rows=moco:32,end_to_end:32,memory_bank:32,end_to_end:512

Each row lowers and compiles the trainer's sharded step (`step.make_sharded_step`,
with the dataset indices the trainer passes) of `configs/mechanisms.py:<method>,imagenet`
(ResNet-50 at 224 px, the paper's v1 setting with K = 65,536) on 8 devices
at <per-device batch> x 8, and reads XLA's per-device `memory_analysis()`
(arguments, temporaries, outputs, aliased = donated state counted once) and
`cost_analysis()` FLOPs. Nothing runs: the state is traced with
`jax.eval_shape`. On a CPU these are proxies of a GPU's figures (the same
HLO; the buffer assignment and fusion differ): compare ratios, not bytes.
Each row compiles in a fresh process (`--row`), one after another.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@dataclasses.dataclass
class Row:
  """One compiled step: its method, load and XLA's analyses (bytes per device)."""
  method: str
  batch_per_device: int
  devices: int
  gflops_per_device: float
  memory: dict  # argument, temp, output, alias: XLA's memory_analysis() sizes in bytes.
  compile_seconds: float

  @property
  def peak_bytes(self) -> int:
    """What the step holds at once: donated (aliased) state counted once."""
    m = self.memory
    return m['argument'] + m['temp'] + m['output'] - m['alias']


def compile_row(config, devices) -> Row:
  """Lowers and compiles the trainer's step of `config` on `devices`; runs nothing."""
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import bench_train  # pylint: disable=g-import-not-at-top
  from moco_jax.core import parallel  # pylint: disable=g-import-not-at-top
  from moco_jax import config_checks  # pylint: disable=g-import-not-at-top
  from moco_jax.training import optim  # pylint: disable=g-import-not-at-top
  from moco_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top

  num_devices = len(devices)
  config_checks.validate(config, num_devices=num_devices)
  mesh = parallel.make_mesh(devices)
  lr = optim.create_learning_rate_fn(config, steps_per_epoch=1000, total_steps=1000)
  num_examples = 1_281_167  # ImageNet train: the memory bank's rows.
  setup = step_lib.make_step_setup(config, num_devices, optim.create_optimizer(config, lr),
                                   num_examples=num_examples)
  state, images, indices = bench_train.abstract_step_inputs(config, setup, mesh)
  start = time.perf_counter()
  compiled = step_lib.make_sharded_step(setup, lr, mesh).lower(
      state, images, indices).compile()
  seconds = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
  memory = compiled.memory_analysis()
  return Row(method=config.method, batch_per_device=config.batch_size // num_devices,
             devices=num_devices, gflops_per_device=float(cost.get('flops', 0.0)) / 1e9,
             memory={name: int(getattr(memory, f'{name}_size_in_bytes'))
                     for name in ('argument', 'temp', 'output', 'alias')},
             compile_seconds=seconds)


def mechanism_config(method: str, batch_per_device: int, devices: int, scale: str = 'imagenet'):
  from configs import mechanisms  # pylint: disable=g-import-not-at-top
  config = mechanisms.get_config(f'{method},{scale}')
  config.batch_size = batch_per_device * devices
  config.moco.queue_size = max(config.moco.queue_size, config.batch_size)
  return config


def table(rows: list[Row]) -> str:
  """Markdown rows, with each row's peak over MoCo's at the same per-device batch."""
  gib = lambda b: f'{b / 2**30:.2f}'
  moco = {r.batch_per_device: r.peak_bytes for r in rows if r.method == 'moco'}
  base = moco.get(32)
  lines = ['| method | batch / device (global) | GFLOP / device / step | arguments GiB | '
           'temporaries GiB | outputs GiB | aliased GiB | peak GiB | peak / MoCo at 32 | '
           'compile s |', '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in rows:
    ratio = f'{r.peak_bytes / base:.2f}' if base else '-'
    lines.append(f'| {r.method} | {r.batch_per_device} ({r.batch_per_device * r.devices}) '
                 f'| {r.gflops_per_device:.0f} | '
                 + ' | '.join(gib(r.memory[k]) for k in ('argument', 'temp', 'output', 'alias'))
                 + f' | {gib(r.peak_bytes)} '
                 f'| {ratio} | {r.compile_seconds:.0f} |')
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rows', default='moco:32,end_to_end:32,memory_bank:32,end_to_end:512')
  parser.add_argument('--row', default='', help='One method:batch, in this process (internal).')
  parser.add_argument('--scale', default='imagenet', help='configs/mechanisms.py scale.')
  parser.add_argument('--devices', type=int, default=8)
  parser.add_argument('--out', default='/tmp/bench_mechanisms.jsonl')
  args = parser.parse_args(argv)
  if args.row:
    import jax  # pylint: disable=g-import-not-at-top
    method, batch = args.row.split(':')
    row = compile_row(mechanism_config(method, int(batch), args.devices, args.scale),
                      jax.devices()[:args.devices])
    with open(args.out, 'a') as f:
      f.write(json.dumps(dataclasses.asdict(row)) + '\n')
    return
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'),
             XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') +
                        f' --xla_force_host_platform_device_count={args.devices}').strip())
  for spec in filter(None, args.rows.split(',')):  # --rows='' only prints --out's table.
    subprocess.run([sys.executable, os.path.abspath(__file__), f'--row={spec}',
                    f'--scale={args.scale}', f'--devices={args.devices}', f'--out={args.out}'],
                   check=True, env=env)
  with open(args.out) as f:
    rows = [Row(**json.loads(line)) for line in f]
  print(table(rows))


if __name__ == '__main__':
  main()
