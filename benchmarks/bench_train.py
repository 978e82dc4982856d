"""Training throughput of the real MoCo v2 step: images/s, FLOPs, MFU, memory.

  python benchmarks/bench_train.py --preset=r50_224 --dtype=bfloat16 --steps=20
  python benchmarks/bench_train.py --preset=all --dtype=bfloat16 --append_docs
  python benchmarks/bench_train.py --preset=r50_224 --dtype=bfloat16 --queue_sweep
  python benchmarks/bench_train.py --preset=tiny --steps=5          # CPU smoke run
  # On a machine without the repo's docs (the GPU lease): write there, merge here.
  python benchmarks/bench_train.py --preset=all --append_docs --docs_path=$OUT/bench.md
  python benchmarks/bench_train.py --merge_docs=FETCHED/bench.md
  # Nothing runs: XLA's FLOPs and memory of the compiled step (CPU proxies).
  python benchmarks/bench_train.py --compile_only --preset=r50_224 --batch=32 --dtype=bfloat16
  python benchmarks/bench_train.py --compile_only --preset=compile_table --append_docs

What is timed is `step.make_sharded_step`, the exact function the trainer
runs (on-device augmentation, both encoders, InfoNCE, SGD, EMA, enqueue), over
every local device, on synthetic uint8 images. By default the batch is placed
on the devices once, so the number is the accelerator's speed and not the
host's; `--feed=host` draws every batch through `batching.train_batches`
and `parallel.shard_batch` inside the timed loop, as training does.

One image = one query view + one key view of it (the unit of the official
code's "images/s" and of "epochs x dataset size"). FLOPs come from XLA's cost
analysis of the compiled step (per device, so they are scaled by the device
count), i.e. the whole step, augmentation included. A run fails if the step
was compiled more than once: a recompiling step would make every number here
meaningless, and would mean the trainer recompiles too.

Runs of several presets or queue sizes each go to a fresh subprocess, so that
one run's peak memory and compilation caches do not leak into the next.
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=wrong-import-position

from configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import tiny  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import flops as flops_lib
from benchmarks import report
from moco_jax.core import parallel
from moco_jax.data import batching
from moco_jax.data import sources
from moco_jax.data import spec as data_spec
from moco_jax import config_checks
from moco_jax.training import optim
from moco_jax.training import state as state_lib
from moco_jax.training import step as step_lib

DOCS_PATH = report.DOCS_PATH
SECTION = '## Training throughput'
PEER_SECTION = '## Versus the official PyTorch MoCo'  # bench_peer.py's.
COMPILE_SECTION = '## Compile-time proxies of GPU cost'

# The recipes the issue asks figures for. `epoch_images` is the train split the
# recipe runs over, for the projected time of 200 epochs.
PRESETS = {
    'r50_224': dict(model='resnet50', stem='imagenet', image_size=224, batch=256,
                    queue=65536, epoch_images=1_281_167),  # ImageNet-1k.
    'r18_128': dict(model='resnet18', stem='imagenet', image_size=128, batch=256,
                    queue=16384, epoch_images=9_469),  # Imagenette train.
    'cifar_r18': dict(model='resnet18', stem='cifar', image_size=32, batch=512,
                      queue=4096, epoch_images=50_000),  # CIFAR-10 train.
    'tiny': dict(model='resnet_tiny', stem='cifar', image_size=32, batch=64, queue=256,
                 epoch_images=0),  # configs/tiny.py: CPU tests only.
}
ALL_PRESETS = ('r50_224', 'r18_128', 'cifar_r18')
QUEUE_SWEEP = (4096, 65536, 1048576)

# Dense bf16 tensor-core peaks from the vendors' data sheets (stated, not
# measured). MFU is always taken against the bf16 peak, also for float32 runs,
# so that the two dtypes are compared on one scale.
STATED_PEAK_TFLOPS = (
    ('H100 PCIe', 756.0),
    ('H100', 989.0),  # SXM / HBM3.
    ('H200', 989.0),
    ('A100', 312.0),
)

TABLE_HEADER = (
    '| preset | model | px | batch | K | dtype | devices | feed | step ms | img/s | img/s/dev '
    '| GFLOP/img | TFLOP/s | MFU | peak mem | compile s | 200 ep (proj.) |\n'
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- '
    '| --- | --- |')


@dataclasses.dataclass
class Result:
  """One benchmark run; `as_row` renders it for docs/benchmarks.md."""
  preset: str
  model: str
  image_size: int
  batch: int
  queue: int
  dtype: str
  num_devices: int
  device_kind: str
  feed: str
  steps: int
  step_seconds: float
  images_per_second: float
  flops_per_image: float
  achieved_tflops: float
  peak_tflops: Optional[float]
  mfu: Optional[float]
  peak_memory_bytes: Optional[int]
  compile_seconds: float
  epoch_images: int
  final_loss: float

  def as_row(self) -> str:
    mfu = f'{100 * self.mfu:.1f}%' if self.mfu is not None else 'n/a'
    mem = (f'{self.peak_memory_bytes / 2**30:.2f} GiB' if self.peak_memory_bytes is not None
           else 'n/a')
    if self.epoch_images:
      projected = 200 * self.epoch_images / self.images_per_second
      epochs = _duration(projected)
    else:
      epochs = 'n/a'
    return (f'| {self.preset} | {self.model} | {self.image_size} | {self.batch} | {self.queue} '
            f'| {self.dtype} | {self.num_devices}x {self.device_kind} | {self.feed} '
            f'| {1000 * self.step_seconds:.1f} | {self.images_per_second:.1f} '
            f'| {self.images_per_second / self.num_devices:.1f} '
            f'| {self.flops_per_image / 1e9:.2f} | {self.achieved_tflops:.2f} | {mfu} | {mem} '
            f'| {self.compile_seconds:.1f} | {epochs} |')


def _duration(seconds: float) -> str:
  if seconds < 120:
    return f'{seconds:.0f} s'
  if seconds < 7200:
    return f'{seconds / 60:.1f} min'
  return f'{seconds / 3600:.1f} h'


def make_config(preset: str, *, batch: Optional[int] = None, dtype: Optional[str] = None,
                image_size: Optional[int] = None, queue: Optional[int] = None):
  """The training config of `preset`, with the command line's overrides.

  Starts from the same config files training uses (tiny from configs/tiny.py),
  so the step benchmarked is the step trained.
  """
  if preset not in PRESETS:
    raise ValueError(f'--preset={preset!r} is not one of {sorted(PRESETS)} or "all".')
  spec = PRESETS[preset]
  config = tiny.get_config() if preset == 'tiny' else default.get_config()
  config.model.name = spec['model']
  config.model.stem = spec['stem']
  config.data.source = 'synthetic'
  config.data.image_size = image_size or spec['image_size']
  config.batch_size = batch or spec['batch']
  config.moco.queue_size = queue or spec['queue']
  if dtype:
    config.model.dtype = dtype
  return config


def stated_peak_tflops(device_kind: str) -> Optional[float]:
  """The data-sheet bf16 dense peak of a known accelerator, else None (CPU: None)."""
  for name, tflops in STATED_PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return tflops
  return None


def check_no_recompilation(jitted, expected: int = 1):
  """Raises if `jitted` holds more than `expected` compiled versions.

  A second entry means some input changed shape, dtype or sharding between
  steps (e.g. a state leaf that grows): timing would then include compiles.
  """
  size = jitted._cache_size()  # pylint: disable=protected-access
  if size != expected:
    raise RuntimeError(f'The train step was compiled {size} times, expected {expected}: an input '
                       'changed shape, dtype or sharding between steps (check the state and the '
                       'batch); the timings would include compilation.')


def peak_memory_bytes(devices) -> Optional[int]:
  """Largest `peak_bytes_in_use` over `devices`, or None where not reported (CPU)."""
  peaks = []
  for device in devices:
    stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
    if stats and 'peak_bytes_in_use' in stats:
      peaks.append(int(stats['peak_bytes_in_use']))
  return max(peaks) if peaks else None


def step_flops(jitted, *args) -> float:
  """XLA's FLOP count of one call of `jitted` on one device (0.0 if unknown).

  `lower().compile()` after the first call is served from the cache, so this
  costs no second compilation.
  """
  analysis = jitted.lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older JAX: one dict per module.
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get('flops', 0.0))


class StepBench:
  """The sharded train step of a config, ready to be timed in windows.

  `run_benchmark` times one window; `bench_peer.py` alternates short windows
  of ours and the peer's so that both see the same load on a shared machine.
  """

  def __init__(self, config, *, feed: str = 'device', devices=None, total_steps: int = 1000):
    if feed not in ('device', 'host'):
      raise ValueError(f'feed={feed!r} is not one of device | host.')
    self.config = config
    self.feed = feed
    self.devices = jax.devices() if devices is None else devices
    num_devices = len(self.devices)
    config_checks.validate(config, num_devices=num_devices, process_count=jax.process_count())
    self.mesh = mesh = parallel.make_mesh(self.devices)
    learning_rate_fn = optim.create_learning_rate_fn(config, steps_per_epoch=total_steps,
                                                     total_steps=total_steps)
    tx = optim.create_optimizer(config, learning_rate_fn)
    setup = step_lib.make_step_setup(config, num_devices, tx)
    # Jitted: op-by-op initialisation of a ResNet-50 costs a compile per op on a GPU.
    create = jax.jit(state_lib.create_train_state, static_argnums=(1, 2, 3))
    state = create(jax.random.PRNGKey(config.seed), setup.method, tx, config.data.image_size)
    self.state = parallel.replicate(state, mesh)
    self.p_step = step_lib.make_sharded_step(setup, learning_rate_fn, mesh)
    self.metrics = None
    self.flops_per_image = 0.0

    side = data_spec.decoded_side(config.data)
    local_batch = config.batch_size // jax.process_count()
    self._batches = None
    if feed == 'host':
      data_config = config.data.copy_and_resolve_references()
      data_config.synthetic_examples = max(2 * config.batch_size, 512)
      ds = sources.open_source(data_spec.from_config(data_config)).load('train')
      self._batches = batching.train_batches(
          ds, global_batch=config.batch_size, seed=0, process_index=jax.process_index(),
          process_count=jax.process_count())
    else:
      host = np.random.default_rng(0).integers(0, 256, (local_batch, side, side, 3), np.uint8)
      index = np.arange(local_batch, dtype=np.int32) + jax.process_index() * local_batch
      self._placed = (parallel.shard_batch(host, mesh), parallel.shard_batch(index, mesh))

  def _inputs(self):
    """(images, indices) of the next batch, sharded as the trainer shards them."""
    if self._batches is not None:
      batch = next(self._batches)
      return (parallel.shard_batch(batch['image'], self.mesh),
              parallel.shard_batch(batch['index'], self.mesh))
    return self._placed

  def first_step(self) -> float:
    """Compiles and runs one step; returns its seconds and reads XLA's FLOPs."""
    inputs = self._inputs()
    start = time.perf_counter()
    self.state, self.metrics = self.p_step(self.state, *inputs)
    jax.block_until_ready((self.state, self.metrics))
    seconds = time.perf_counter() - start
    flops = step_flops(self.p_step, self.state, *inputs)
    self.flops_per_image = flops * len(self.devices) / self.config.batch_size
    return seconds

  def run(self, steps: int) -> float:
    """Seconds for `steps` steps, dispatched back to back, blocked at the end."""
    start = time.perf_counter()
    for _ in range(steps):
      self.state, self.metrics = self.p_step(self.state, *self._inputs())
    jax.block_until_ready((self.state, self.metrics))
    return time.perf_counter() - start

  def finish(self) -> float:
    """Checks compilation count and loss; returns the last loss."""
    if self._batches is not None:
      self._batches.close()  # Stops the prefetch thread.
    check_no_recompilation(self.p_step)
    loss = float(jax.device_get(self.metrics['train_loss']))
    if not math.isfinite(loss):
      raise FloatingPointError(f'train_loss is {loss} at the end of the benchmark.')
    return loss


def run_benchmark(config, *, preset: str = 'custom', steps: int = 20, warmup: int = 3,
                  feed: str = 'device', peak_tflops: Optional[float] = None,
                  devices=None) -> Result:
  """Compiles and times the sharded train step of `config` on `devices`.

  Args:
    config: a training config (see `make_config`); data.source is ignored.
    preset: the name shown in the table.
    steps: timed steps, after the compiling step and `warmup` more.
    warmup: untimed steps after the first (autotuning, allocator growth).
    feed: 'device' (one batch placed on the devices once) or 'host' (each
      batch drawn by the input pipeline and sharded inside the timed loop).
    peak_tflops: per-device peak for the MFU; None: the stated peak of a
      known accelerator, or no MFU.
    devices: the devices to shard over; default all of them.

  Returns:
    A Result; raises if the step recompiled or the loss is not finite.
  """
  bench = StepBench(config, feed=feed, devices=devices, total_steps=1 + warmup + steps)
  compile_seconds = bench.first_step()
  bench.run(warmup)
  elapsed = bench.run(steps)
  final_loss = bench.finish()

  devices = bench.devices
  num_devices = len(devices)
  step_seconds = elapsed / max(steps, 1)
  images_per_second = config.batch_size / step_seconds
  achieved = bench.flops_per_image * images_per_second / 1e12
  device_kind = devices[0].device_kind
  if peak_tflops is None:
    peak_tflops = stated_peak_tflops(device_kind)
  mfu = achieved / (peak_tflops * num_devices) if peak_tflops else None
  return Result(
      preset=preset, model=config.model.name + ('_cifar' if config.model.stem == 'cifar' else ''),
      image_size=config.data.image_size, batch=config.batch_size,
      queue=config.moco.queue_size, dtype=config.model.dtype, num_devices=num_devices,
      device_kind=device_kind, feed=feed, steps=steps, step_seconds=step_seconds,
      images_per_second=images_per_second, flops_per_image=bench.flops_per_image,
      achieved_tflops=achieved, peak_tflops=peak_tflops, mfu=mfu,
      peak_memory_bytes=peak_memory_bytes(
          [d for d in devices if d.process_index == jax.process_index()]),
      compile_seconds=compile_seconds,
      epoch_images=PRESETS.get(preset, {}).get('epoch_images', 0), final_loss=final_loss)


# --compile_only: what the issue asks for, R50 224 at 32 (the paper's load per GPU) and 256
# images per device in both dtypes, and the tiny preset. (preset, batch per device, dtype).
COMPILE_TABLE = (
    ('tiny', 64, 'float32'),
    ('r50_224', 32, 'float32'), ('r50_224', 32, 'bfloat16'),
    ('r50_224', 256, 'float32'), ('r50_224', 256, 'bfloat16'),
)
COMPILE_HEADER = (
    '| preset | model | px | batch/dev | K | dtype | XLA GFLOP/img | analytic GFLOP/img '
    '| XLA / analytic | analytic, all taps | arguments | temporaries | outputs | aliased | peak (args + temps + outputs '
    '- aliased) | compile s |\n'
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- '
    '| --- |')


@dataclasses.dataclass
class CompileResult:
  """XLA's cost and memory analyses of the compiled step; nothing was run."""
  preset: str
  model: str
  image_size: int
  batch_per_device: int
  queue: int
  dtype: str
  backend: str
  xla_flops_per_image: float
  analytic_flops_per_image: float  # Taps on zero padding left out (as XLA counts).
  analytic_all_taps_per_image: float  # Every tap (the published convention, 4.1 GMACs R50).
  argument_bytes: int
  temp_bytes: int
  output_bytes: int
  alias_bytes: int
  compile_seconds: float

  @property
  def peak_bytes(self) -> int:
    """What the step needs at once: donated (aliased) state is counted once."""
    return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes

  def as_row(self) -> str:
    gib = lambda b: f'{b / 2**30:.2f} GiB'
    return (f'| {self.preset} | {self.model} | {self.image_size} | {self.batch_per_device} '
            f'| {self.queue} | {self.dtype} | {self.xla_flops_per_image / 1e9:.3f} '
            f'| {self.analytic_flops_per_image / 1e9:.3f} '
            f'| {self.xla_flops_per_image / self.analytic_flops_per_image:.3f} '
            f'| {self.analytic_all_taps_per_image / 1e9:.3f} | {gib(self.argument_bytes)} | {gib(self.temp_bytes)} | {gib(self.output_bytes)} '
            f'| {gib(self.alias_bytes)} | {gib(self.peak_bytes)} | {self.compile_seconds:.1f} |')


def abstract_step_inputs(config, setup, mesh):
  """ShapeDtypeStructs of (state, images, indices) with the shardings the trainer uses.

  `jax.eval_shape` traces the state's initialisation without running it, so
  even R50 at batch 256 costs no memory here.
  """
  create = functools.partial(state_lib.create_train_state, method=setup.method, tx=setup.tx,
                             image_size=config.data.image_size)
  state = jax.eval_shape(create, jax.random.PRNGKey(config.seed))
  replicated = NamedSharding(mesh, P())
  state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                       state)
  side = data_spec.decoded_side(config.data)
  images = jax.ShapeDtypeStruct((config.batch_size, side, side, 3), np.uint8,
                                sharding=NamedSharding(mesh, P(parallel.AXIS)))
  indices = jax.ShapeDtypeStruct((config.batch_size,), np.int32,
                                 sharding=NamedSharding(mesh, P(parallel.AXIS)))
  return state, images, indices


def compile_only(config, *, preset: str = 'custom', devices=None) -> CompileResult:
  """Lowers and compiles the sharded train step of `config`; runs nothing.

  FLOPs and memory are XLA's analyses of the compiled per-device program, on
  the backend at hand: on a CPU they are proxies of a GPU's (the same HLO
  FLOPs; the buffer assignment differs, e.g. XLA:CPU keeps float32 copies of
  bfloat16 convolutions' operands).
  """
  devices = jax.devices() if devices is None else devices
  num_devices = len(devices)
  config_checks.validate(config, num_devices=num_devices, process_count=jax.process_count())
  mesh = parallel.make_mesh(devices)
  learning_rate_fn = optim.create_learning_rate_fn(config, steps_per_epoch=1000,
                                                   total_steps=1000)
  tx = optim.create_optimizer(config, learning_rate_fn)
  setup = step_lib.make_step_setup(config, num_devices, tx)
  state, images, indices = abstract_step_inputs(config, setup, mesh)
  start = time.perf_counter()
  compiled = step_lib.make_sharded_step(setup, learning_rate_fn, mesh).lower(
      state, images, indices).compile()
  seconds = time.perf_counter() - start
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older JAX: one dict per module.
    analysis = analysis[0] if analysis else {}
  memory = compiled.memory_analysis()
  per_device = config.batch_size // num_devices
  return CompileResult(
      preset=preset, model=config.model.name + ('_cifar' if config.model.stem == 'cifar' else ''),
      image_size=config.data.image_size, batch_per_device=per_device,
      queue=config.moco.queue_size, dtype=config.model.dtype, backend=devices[0].platform,
      xla_flops_per_image=float((analysis or {}).get('flops', 0.0)) / per_device,
      analytic_flops_per_image=flops_lib.config_step_flops(config).total,
      analytic_all_taps_per_image=flops_lib.config_step_flops(config, exact=False).total,
      argument_bytes=int(memory.argument_size_in_bytes),
      temp_bytes=int(memory.temp_size_in_bytes), output_bytes=int(memory.output_size_in_bytes),
      alias_bytes=int(memory.alias_size_in_bytes), compile_seconds=seconds)


def _compile_in_subprocess(preset: str, batch: int, dtype: str) -> CompileResult:
  """One compile in a fresh interpreter (no cache or memory carried between rows)."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'result.json')
    subprocess.run([sys.executable, os.path.abspath(__file__), '--compile_only',
                    f'--preset={preset}', f'--batch={batch}', f'--dtype={dtype}',
                    f'--json_out={out}'], check=True)
    with open(out) as f:
      return CompileResult(**json.load(f))


def main_compile_only(args) -> list[CompileResult]:
  """--compile_only: one config, or with --preset=compile_table every COMPILE_TABLE row."""
  if args.preset == 'compile_table':
    results = []
    for preset, batch, dtype in COMPILE_TABLE:
      results.append(_compile_in_subprocess(preset, batch * jax.device_count(), dtype))
  else:
    config = make_config(args.preset, batch=args.batch, dtype=args.dtype,
                         image_size=args.image_size, queue=args.queue)
    results = [compile_only(config, preset=args.preset)]
    if args.json_out:
      with open(args.json_out, 'w') as f:
        json.dump(dataclasses.asdict(results[0]), f)
  print(COMPILE_HEADER)
  print('\n'.join(r.as_row() for r in results))
  if args.append_docs and not args.json_out:
    append_docs([r.as_row() for r in results],
                'python benchmarks/bench_train.py --compile_only --preset=' + args.preset,
                note=('XLA:' + results[0].backend.upper() + ' proxies: nothing ran; FLOPs and '
                      'buffer sizes are XLA\'s analyses of the compiled per-device step. ' +
                      args.note).strip(),
                path=args.docs_path, section=COMPILE_SECTION, header=COMPILE_HEADER)
  return results


def append_docs(rows: list[str], command: str, note: str = '', path: str = DOCS_PATH,
                section: str = SECTION, header: str = TABLE_HEADER, raw: Optional[str] = None):
  """Adds a dated table to the end of `section` (default '## Training throughput').

  Never rewrites what is there: the file gets a '# Benchmarks' title if new,
  the section is added at the end if missing, and the table goes just before
  the next '## ' heading (other sections belong to other benchmarks). `raw`,
  if given, is inserted as it is instead of a table.
  """
  if raw is not None:
    block = raw
  else:
    block = [f'Run: `{command}`', '', f'Environment: {report.environment_line()}.']
    if note:
      block += ['', note]
    block += ['', header, *rows, '']
    block = '\n'.join(block) + '\n'
  report.append_section(section, block, path=path)


def _run_in_subprocess(preset: str, queue: Optional[int], args) -> Result:
  """One run in a fresh interpreter: its own peak memory, its own caches."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'result.json')
    cmd = [sys.executable, os.path.abspath(__file__), f'--preset={preset}',
           f'--steps={args.steps}', f'--warmup={args.warmup}', f'--feed={args.feed}',
           f'--json_out={out}']
    for flag in ('batch', 'dtype', 'image_size', 'peak_tflops'):
      value = getattr(args, flag)
      if value is not None:
        cmd.append(f'--{flag}={value}')
    if queue is not None:
      cmd.append(f'--queue={queue}')
    subprocess.run(cmd, check=True)
    with open(out) as f:
      return Result(**json.load(f))


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', default='tiny',
                      help=f'one of {sorted(PRESETS)}, or "all" ({", ".join(ALL_PRESETS)}).')
  parser.add_argument('--batch', type=int, default=None, help='global batch (default: preset).')
  parser.add_argument('--dtype', default=None, choices=('float32', 'bfloat16'),
                      help='compute dtype (default: float32, the config default).')
  parser.add_argument('--image_size', type=int, default=None, help='crop size, px.')
  parser.add_argument('--queue', type=int, default=None, help='queue size K (default: preset).')
  parser.add_argument('--queue_sweep', action='store_true',
                      help=f'one run per K in {QUEUE_SWEEP} (or --queue_sizes).')
  parser.add_argument('--queue_sizes', default=None,
                      help='comma-separated K for --queue_sweep, e.g. 4096,65536.')
  parser.add_argument('--steps', type=int, default=20, help='timed steps.')
  parser.add_argument('--warmup', type=int, default=3, help='untimed steps after compiling.')
  parser.add_argument('--feed', default='device', choices=('device', 'host'),
                      help='device: batch placed once; host: input pipeline in the loop.')
  parser.add_argument('--peak_tflops', type=float, default=None,
                      help='per-device peak for MFU (default: stated bf16 peak if known).')
  parser.add_argument('--append_docs', action='store_true',
                      help=f'append the table to {os.path.relpath(DOCS_PATH, _ROOT)}.')
  parser.add_argument('--docs_path', default=DOCS_PATH,
                      help='the file --append_docs writes (on a GPU machine: under $OUT).')
  parser.add_argument('--merge_docs', default=None,
                      help='copy the tables of this file\'s throughput and peer sections '
                      '(e.g. one written on a GPU machine) into --docs_path, and exit.')
  parser.add_argument('--note', default='', help='a sentence stored with the table.')
  parser.add_argument('--json_out', default=None, help='write the Result as JSON (one run).')
  parser.add_argument('--compile_only', action='store_true',
                      help='lower and compile the step, run nothing: XLA FLOPs vs the analytic '
                      'count and the memory analysis (--preset=compile_table: every row).')
  return parser.parse_args(argv)


def merge_docs(source: str, path: str = DOCS_PATH, sections=(SECTION, PEER_SECTION)) -> int:
  """Appends the body of each of `sections` found in `source` to that section of `path`.

  For runs made where the repository's docs are not (the GPU machine writes
  its tables under $OUT): the text is copied verbatim, nothing is rewritten.
  Returns the number of sections merged; raises if there was none.
  """
  with open(source) as f:
    lines = f.read().splitlines(keepends=True)
  merged = 0
  for section in sections:
    start = next((i for i, line in enumerate(lines) if line.rstrip() == section), None)
    if start is None:
      continue
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith('## ')),
               len(lines))
    body = ''.join(lines[start + 1:end]).strip('\n')
    if body:
      append_docs([], '', path=path, section=section, raw=body + '\n')
      merged += 1
  if not merged:
    raise ValueError(f'{source} has no non-empty section among {list(sections)}.')
  return merged


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.merge_docs:
    merge_docs(args.merge_docs, args.docs_path)
    return []
  if args.compile_only:
    return main_compile_only(args)
  presets = list(ALL_PRESETS) if args.preset == 'all' else [args.preset]
  if args.queue_sweep:
    queues = ([int(q) for q in args.queue_sizes.split(',')] if args.queue_sizes
              else list(QUEUE_SWEEP))
  else:
    queues = [args.queue]
  runs = [(p, q) for p in presets for q in queues]
  if len(runs) == 1:
    preset, queue = runs[0]
    config = make_config(preset, batch=args.batch, dtype=args.dtype,
                         image_size=args.image_size, queue=queue)
    results = [run_benchmark(config, preset=preset, steps=args.steps, warmup=args.warmup,
                             feed=args.feed, peak_tflops=args.peak_tflops)]
    if args.json_out:
      with open(args.json_out, 'w') as f:
        json.dump(dataclasses.asdict(results[0]), f)
  else:
    results = [_run_in_subprocess(p, q, args) for p, q in runs]
  rows = [r.as_row() for r in results]
  print(TABLE_HEADER)
  print('\n'.join(rows))
  if args.append_docs and not args.json_out:
    command = 'python benchmarks/bench_train.py ' + ' '.join(
        a for a in (sys.argv[1:] if argv is None else argv)
        if a != '--append_docs' and not a.startswith(('--docs_path', '--note')))
    append_docs(rows, command.strip(), note=args.note, path=args.docs_path)
  return results


if __name__ == '__main__':
  main()
