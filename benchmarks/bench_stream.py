"""Streaming input benchmarks (issues 9, 29): host throughput per core by input path, and memory.

  # 1. ImageNet-like JPEGs (about 500x375, quality 90) in a temporary directory, never committed:
  python benchmarks/bench_stream.py generate --out=/tmp/inet_like --num=10000
  # 2. Host throughput per core of each input path (issue 29's table), same cores, same files:
  python benchmarks/bench_stream.py host --data=/tmp/inet_like --cores=1 \
      --peer_python=/work/.peer_venv/bin/python
  # 3. XLA FLOPs of the train step with the crops on the host vs on the device:
  python benchmarks/bench_stream.py flops --preset=r50_224 --batch=8
  # 4. Peak host RSS of a short configs/imagenet.py run on two folder sizes:
  python benchmarks/bench_stream.py memory --sizes=2500,10000 --out=/tmp/mem_trees

`host` runs each row in a fresh process pinned to the same `--cores` CPUs
(sched_setaffinity), over the same files, and prints img/s per core and the
ratios. The rows (`HOST_ROWS`, one function each; a new input path adds one):
  a  host crops     today's streamed path (data.stream_crops='host'):
                    `host_crops.train_batches`, `cores` grain worker
                    processes: decode (JPEG draft where the crops allow) + two
                    RandomResizedCrop(224, scale=(0.2, 1)) views -> uint8
                    [B, 2, 224, 224, 3]. Colour ops later, on the accelerator.
     (threads)      the same in `cores` threads of this process, for reference.
  b  device crops   JPEG folder + crops on the device (data.stream_crops=
                    'device', the default): `canvas_loader.train_batches` as
                    training runs it (`cores` decoding threads in this
                    process, the auto canvas: 512 px), the host only decodes
                    each image into its canvas -> uint8 [B, 512, 512, 3] +
                    sizes; Pillow, and simplejpeg with --simplejpeg.
  c  packed shards  the same loader on the packed copy of --data (`<data>_packed`,
                    made once by --mode=pack's code: 256 px short side, JPEG
                    quality 90): one random ArrayRecord read + one decode per
                    image into the auto canvas (384 px).
  d  torchvision    torchvision ImageFolder + DataLoader(num_workers=cores),
                    each example two RandomResizedCrop(224, scale=(0.2, 1)) +
                    PILToTensor views: the same host work as row a. Needs
                    torch, in its own venv: --peer_python (row skipped, and
                    said so, without it). With it also `torch-mocov2`: MoCo
                    v2's whole aug+ per view on the host, as the official
                    main_moco.py runs it.
Throughput = images (each with its two views) per second after `--warmup`
batches, divided by the cores for per core.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------
# Data.



def _default_canvas() -> int:
  """The canvas side `data.canvas_side=0` gives a JPEG folder (spec.DEFAULT_CANVAS)."""
  sys.path.insert(0, _ROOT)
  from moco_jax.data import spec  # pylint: disable=g-import-not-at-top
  return spec.DEFAULT_CANVAS


def _source(data_config):
  """The data layer's source of a data section (imported late: workers import this file)."""
  from moco_jax.data import sources  # pylint: disable=g-import-not-at-top
  from moco_jax.data import spec  # pylint: disable=g-import-not-at-top
  return sources.open_source(spec.from_config(data_config))

def _photo(rng, width, height):
  """A photo-like JPEG body: a smooth colour field, mid-frequency texture and fine grain."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  small = rng.integers(0, 256, (max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
  base = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), np.float32)
  mid = rng.normal(0, 1, (height // 6 + 1, width // 6 + 1, 3)) * 40 + 128
  mid = Image.fromarray(np.clip(mid, 0, 255).astype(np.uint8)).resize((width, height),
                                                                         Image.BILINEAR)
  fine = rng.normal(0, 9, (height, width, 3))
  pixels = base + 0.6 * (np.asarray(mid, np.float32) - 128) + fine
  return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _size(rng):
  """ImageNet's typical sizes: mostly 500x375 / 375x500 / 500x333, some in between."""
  r = rng.random()
  if r < 0.55:
    return 500, 375
  if r < 0.7:
    return 375, 500
  if r < 0.85:
    return 500, 333
  w = int(rng.integers(300, 501))
  return w, int(w * rng.uniform(0.6, 1.0))


def _generate_chunk(args):
  out, start, stop, classes, seed, split = args
  import numpy as np  # pylint: disable=g-import-not-at-top
  for i in range(start, stop):
    rng = np.random.default_rng([seed, i])
    folder = os.path.join(out, split, f'n{i % classes:08d}')
    os.makedirs(folder, exist_ok=True)
    _photo(rng, *_size(rng)).save(os.path.join(folder, f'img_{i:07d}.JPEG'), quality=90)
  return stop - start


def generate(out: str, num: int, classes: int = 100, seed: int = 0, small: bool = False,
             split: str = 'train', unique: int = 0):
  """Writes `num` JPEGs as OUT/<split>/n<class>/img_<i>.JPEG (ImageFolder layout).

  With `unique` > 0 only the first `unique` images are drawn; image i >= unique
  is a byte copy of image i % unique (a distinct file with the same decode
  cost: on a busy host, drawing 20,000 photo-like images takes most of an hour).
  """
  import multiprocessing  # pylint: disable=g-import-not-at-top
  if small:
    return _generate_small(out, num, classes, seed)
  drawn = min(num, unique) if unique > 0 else num
  chunks = [(out, s, min(drawn, s + 200), classes, seed, split) for s in range(0, drawn, 200)]
  with multiprocessing.Pool(os.cpu_count()) as pool:
    done = sum(pool.map(_generate_chunk, chunks))
  name = lambda i: os.path.join(out, split, f'n{i % classes:08d}', f'img_{i:07d}.JPEG')
  for i in range(drawn, num):
    os.makedirs(os.path.dirname(name(i)), exist_ok=True)
    shutil.copyfile(name(i % drawn), name(i))
    done += 1
  sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs]
  print(f'{done} JPEGs in {out}: mean {sum(sizes) / len(sizes) / 1024:.0f} KiB')


def _generate_small(out: str, num: int, classes: int, seed: int):
  """Tiny JPEGs (decode cost is not what the memory benchmark measures)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  for i in range(num):
    folder = os.path.join(out, 'train', f'n{i % classes:08d}')
    os.makedirs(folder, exist_ok=True)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(small).resize((96, 72), Image.BICUBIC).save(
        os.path.join(folder, f'img_{i:07d}.JPEG'), quality=90)
  print(f'{num} small JPEGs in {out}')


# --------------------------------------------------------------------------
# Host throughput.


def _pin(cores: int):
  os.sched_setaffinity(0, set(range(cores)))


def run_ours(data: str, cores: int, batch: int, steps: int, warmup: int, size: int,
             threads: bool = False) -> dict:
  """The host-crop loader: `cores` grain worker processes (its default, `loader_workers`), or
  `cores` threads in this process (`threads`), pinned with this one to `cores` CPUs."""
  _pin(cores)
  sys.path.insert(0, _ROOT)
  from configs import default  # pylint: disable=g-import-not-at-top
  from moco_jax.data import host_crops  # pylint: disable=g-import-not-at-top
  from moco_jax.data import streaming  # pylint: disable=g-import-not-at-top
  config = default.get_config().data
  config.update(dict(path=data, image_size=size, max_in_memory_gb=0.0,
                     cache_dir=os.path.join(tempfile.gettempdir(), 'bench_stream_cache')))
  source = _source(config).open('train')
  it = host_crops.train_batches(source, global_batch=batch, seed=0, image_size=size,
                               crop_scale=(0.2, 1.0), num_threads=cores if threads else 1,
                               num_processes=0 if threads else cores, prefetch=2)
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(steps):
    out = next(it)
  seconds = time.perf_counter() - start
  assert out['image'].shape == (batch, 2, size, size, 3)
  it.close()
  name = 'a: host crops' + (' (threads)' if threads else '')
  return {'loader': name, 'images_per_sec': steps * batch / seconds}


def run_canvas(data: str, cores: int, batch: int, steps: int, warmup: int, size: int,
               canvas_side: int = 0, decoder: str = 'pillow', name: str = 'b: device crops') -> dict:
  """Rows b and c: the canvas loader (the host decodes only) over `data` (a JPEG folder or a
  packed copy), as training runs it: `cores` decoding threads in this process (the default,
  `loader_workers(decode_only=True)`), the canvas side `data.canvas_side` resolves to (0: auto)."""
  _pin(cores)
  sys.path.insert(0, _ROOT)
  from configs import default  # pylint: disable=g-import-not-at-top
  from moco_jax.data import canvas_loader  # pylint: disable=g-import-not-at-top
  from moco_jax.data import streaming  # pylint: disable=g-import-not-at-top
  config = default.get_config().data
  config.update(dict(path=data, image_size=size, max_in_memory_gb=0.0, canvas_side=canvas_side,
                     cache_dir=os.path.join(tempfile.gettempdir(), 'bench_stream_cache')))
  data_source = _source(config)
  canvas_side = data_source.spec.canvas_side
  source = data_source.open('train')
  it = canvas_loader.train_batches(source, global_batch=batch, seed=0, canvas_side=canvas_side,
                                   num_threads=cores, num_processes=0, prefetch=2,
                                   decoder=decoder)
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  reduced = 0
  for _ in range(steps):
    out = next(it)
    reduced += int(out['reduced'].sum())
  seconds = time.perf_counter() - start
  assert out['image'].shape == (batch, canvas_side, canvas_side, 3)
  it.close()
  name += '' if decoder == 'pillow' else f' ({decoder})'
  return {'loader': name, 'images_per_sec': steps * batch / seconds, 'reduced': reduced,
          'canvas_side': canvas_side}


def run_canvas_loop(data: str, images: int, canvas_side: int = 512,
                    decoder: str = 'pillow') -> dict:
  """Row b's bare per-image work (read, decode into a canvas) in a loop on one core: no loader."""
  _pin(1)
  sys.path.insert(0, _ROOT)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  from moco_jax.data import canvas_loader  # pylint: disable=g-import-not-at-top
  from moco_jax.data import streaming  # pylint: disable=g-import-not-at-top
  config = default.get_config().data
  config.update(dict(path=data, max_in_memory_gb=0.0,
                     cache_dir=os.path.join(tempfile.gettempdir(), 'bench_stream_cache')))
  source = _source(config).open('train')
  canvas = np.empty((canvas_side, canvas_side, 3), np.uint8)
  for i in range(20):
    canvas_loader.decode_into(source.read(i % len(source)), canvas, decoder)
  start = time.perf_counter()
  for i in range(images):
    canvas_loader.decode_into(source.read((20 + i) % len(source)), canvas, decoder)
  name = 'b-loop' + ('' if decoder == 'pillow' else f' ({decoder})')
  return {'loader': name, 'images_per_sec': images / (time.perf_counter() - start)}


def run_ours_loop(data: str, images: int, size: int) -> dict:
  """The bare per-image work (read, decode, two crops) in a loop on one core: no loader."""
  _pin(1)
  sys.path.insert(0, _ROOT)
  from configs import default  # pylint: disable=g-import-not-at-top
  from moco_jax.data import host_crops  # pylint: disable=g-import-not-at-top
  from moco_jax.data import streaming  # pylint: disable=g-import-not-at-top
  config = default.get_config().data
  config.update(dict(path=data, image_size=size, max_in_memory_gb=0.0,
                     cache_dir=os.path.join(tempfile.gettempdir(), 'bench_stream_cache')))
  source = _source(config).open('train')
  load = host_crops.LoadExample(source, global_batch=256, seed=0, process_index=0, process_count=1,
                               image_size=size, crop_scale=(0.2, 1.0),
                               crop_ratio=(3 / 4, 4 / 3))
  for i in range(20):
    load(i)
  start = time.perf_counter()
  for i in range(images):
    load(20 + i)
  return {'loader': 'a-loop', 'images_per_sec': images / (time.perf_counter() - start)}


def run_torch(data: str, cores: int, batch: int, steps: int, warmup: int, size: int,
              transform: str) -> dict:
  """torchvision ImageFolder + DataLoader(num_workers=cores), two views per image."""
  _pin(cores)
  import torch  # pylint: disable=g-import-not-at-top
  from torchvision import datasets, transforms  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)
  if transform == 'crop':
    view = transforms.Compose([transforms.RandomResizedCrop(size, scale=(0.2, 1.0)),
                               transforms.PILToTensor()])
  else:  # MoCo v2's aug+ (main_moco.py --aug-plus), GaussianBlur as torchvision's.
    normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    view = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=(0.2, 1.0)),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([transforms.GaussianBlur(23, sigma=(0.1, 2.0))], p=0.5),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        normalize,
    ])

  class TwoCrops:
    def __call__(self, x):
      return [view(x), view(x)]

  ds = datasets.ImageFolder(os.path.join(data, 'train'), TwoCrops())
  loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=cores,
                                       drop_last=True, persistent_workers=True, prefetch_factor=2)
  it = iter(loader)
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(steps):
    views, _ = next(it)
  seconds = time.perf_counter() - start
  assert tuple(views[0].shape) == (batch, 3, size, size)
  name = 'd: torchvision' if transform == 'crop' else f'torch-{transform}'
  return {'loader': name, 'images_per_sec': steps * batch / seconds}


def _row_a(args):
  return 'a: host crops', f'b.run_ours({_common(args)})', sys.executable


def _row_a_threads(args):
  return 'a: host crops (threads)', f'b.run_ours({_common(args)}, True)', sys.executable


def _row_b(args):
  return ('b: device crops', f'b.run_canvas({_common(args)}, {args.canvas_side}, "pillow")',
          sys.executable)


def _row_b_simplejpeg(args):
  if not args.simplejpeg:
    return None
  return ('b: device crops (simplejpeg)',
          f'b.run_canvas({_common(args)}, {args.canvas_side}, "simplejpeg")', sys.executable)


def _row_d(args):
  if not args.peer_python:
    return 'd: torchvision', 'needs --peer_python (a venv with torch + torchvision)', None
  return 'd: torchvision', f'b.run_torch({_common(args)}, "crop")', args.peer_python


def _row_torch_mocov2(args):
  if not args.peer_python:
    return None
  return 'torch-mocov2', f'b.run_torch({_common(args)}, "mocov2")', args.peer_python


def _packed_common(args) -> str:
  """`_common(args)` over the packed copy of `args.data`, made once beside it (bench_packed.py)."""
  sys.path.insert(0, os.path.join(_ROOT, 'benchmarks'))
  import bench_packed  # pylint: disable=g-import-not-at-top
  return _common(args).replace(repr(args.data), repr(bench_packed.packed_copy(args.data)), 1)


def _row_c(args):
  return ('c: packed shards',
          f'b.run_canvas({_packed_common(args)}, 0, "pillow", "c: packed shards")', sys.executable)


def _row_c_simplejpeg(args):
  if not args.simplejpeg:
    return None
  return ('c: packed shards (simplejpeg)',
          f'b.run_canvas({_packed_common(args)}, 0, "simplejpeg", "c: packed shards")',
          sys.executable)


# The rows of `host`, in order: each `args -> (name, call, python)`; python None means the
# row cannot run here and `call` says why; None skips it.
HOST_ROWS = [_row_a, _row_a_threads, _row_b, _row_b_simplejpeg, _row_c, _row_c_simplejpeg,
             _row_d, _row_torch_mocov2]
# (numerator, denominator) rows whose per-core ratio the table reports.
RATIOS = [('b-loop', 'a-loop'), ('b-loop (simplejpeg)', 'a-loop'),
          ('b: device crops', 'a: host crops'), ('b: device crops (simplejpeg)', 'a: host crops'),
          ('c: packed shards', 'a: host crops'), ('c: packed shards', 'd: torchvision'),
          ('c: packed shards (simplejpeg)', 'a: host crops'),
          ('c: packed shards (simplejpeg)', 'd: torchvision'),
          ('c: packed shards', 'a: host crops (threads)'),
          ('b: device crops', 'a: host crops (threads)'),
          ('b: device crops', 'd: torchvision'), ('b: device crops (simplejpeg)', 'd: torchvision'),
          ('a: host crops', 'd: torchvision')]


def _common(args) -> str:
  return f'{args.data!r}, {args.cores}, {args.batch}, {args.steps}, {args.warmup}, {args.size}'


def _fresh(call: str, python: str, nice: int) -> dict:
  """Runs `call` (an expression over bench_stream as b) in a fresh `python`; its dict."""
  code = (f'import sys, json; sys.path.insert(0, {os.path.join(_ROOT, "benchmarks")!r}); '
          f'import bench_stream as b\nif __name__ == "__main__":\n  print("RESULT", '
          f'json.dumps({call}))')
  script = os.path.join(tempfile.gettempdir(), f'bench_stream_{os.getpid()}.py')
  with open(script, 'w') as f:
    f.write(code)
  out = subprocess.run(['nice', '-n', str(nice), python, script], capture_output=True,
                       text=True, timeout=3600, cwd=_ROOT)
  lines = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')]
  if out.returncode or not lines:
    raise RuntimeError(f'{call} failed:\n{out.stderr[-4000:]}')
  return json.loads(lines[-1][len('RESULT '):])


def host(args):
  """Every row of HOST_ROWS, `--rounds` times alternating (same load for all); best of rounds."""
  rows, missing = [], {}
  for _ in range(args.rounds):
    for make in HOST_ROWS:
      row = make(args)
      if row is None:
        continue
      name, call, python = row
      if python is None:
        missing[name] = call
        continue
      rows.append(_fresh(call, python, args.nice))
    if args.loop:  # The bare per-image work of rows a and b, no loader, one core.
      rows.append(_fresh(f'b.run_ours_loop({args.data!r}, {args.loop}, {args.size})',
                         sys.executable, args.nice))
      for decoder in ('pillow', 'simplejpeg') if args.simplejpeg else ('pillow',):
        rows.append(_fresh(f'b.run_canvas_loop({args.data!r}, {args.loop}, '
                           f'{args.canvas_side or _default_canvas()}, '
                           f'{decoder!r})', sys.executable, args.nice))
  best = {}
  for row in rows:
    best[row['loader']] = max(best.get(row['loader'], 0), row['images_per_sec'])
  load = os.getloadavg()
  print(f'cores={args.cores} batch={args.batch} steps={args.steps} size={args.size} '
        f'canvas={args.canvas_side} rounds={args.rounds} (best of rounds); load avg '
        f'{load[0]:.1f}')
  print('| row | cores | img/s | img/s per core |')
  print('| --- | --- | --- | --- |')
  per_core = {}
  for name, ips in best.items():
    cores = 1 if name.endswith('loop') or '-loop ' in name else args.cores
    per_core[name] = ips / cores
    print(f'| {name} | {cores} | {ips:.1f} | {ips / cores:.1f} |')
  for name, why in missing.items():
    print(f'| {name} | - | - | {why} |')
  print()
  print('| ratio (per core) | value |')
  print('| --- | --- |')
  for top, bottom in RATIOS:
    if top in per_core and bottom in per_core:
      print(f'| {top} / {bottom} | {per_core[top] / per_core[bottom]:.2f}x |')
  for name, value in per_core.items():
    if name[0] in 'abc':
      print(f'Cores to feed 5,000 img/s (one H100, two 224 px views each) with {name}: '
            f'{5000 / value:.1f} at {value:.0f} img/s per core.')
  return best


# --------------------------------------------------------------------------
# FLOPs of the step with the crops on the host and on the device.


def step_flops(preset: str, batch: int, canvas_side: int, dtype: str) -> list:
  """XLA's FLOPs per image of the compiled train step and of its augmentation alone.

  Three inputs of the same step: crops cut on the host (uint8 [B, 2, S, S, 3]),
  canvases cut in the step (uint8 [B, C, C, 3] + sizes), and for reference the
  in-memory path (uint8 [B, cache side, ..., 3]). Compiled on this machine's
  first device (XLA:CPU here: the HLO's FLOPs are the GPU's).
  """
  sys.path.insert(0, _ROOT)
  sys.path.insert(0, os.path.join(_ROOT, 'benchmarks'))
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import bench_train  # pylint: disable=g-import-not-at-top
  from moco_jax.augmentation import augment  # pylint: disable=g-import-not-at-top
  from moco_jax.core import parallel  # pylint: disable=g-import-not-at-top
  from moco_jax.training import optim  # pylint: disable=g-import-not-at-top
  from moco_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  config = bench_train.make_config(preset, batch=batch, dtype=dtype)
  size = config.data.image_size
  devices = jax.devices()[:1]
  mesh = parallel.make_mesh(devices)
  lr = optim.create_learning_rate_fn(config, steps_per_epoch=1000, total_steps=1000)
  tx = optim.create_optimizer(config, lr)
  sharded = NamedSharding(mesh, P(parallel.AXIS))

  def spec(shape, dtype_):
    return jax.ShapeDtypeStruct(shape, dtype_, sharding=sharded)

  def flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
      analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get('flops', 0.0)) / batch

  results = []
  indices = spec((batch,), np.int32)
  for name, kwargs, inputs in (
      ('host crops (a)', dict(host_crops=True), (spec((batch, 2, size, size, 3), np.uint8),)),
      ('device crops (b)', dict(canvas=True),
       (spec((batch, canvas_side, canvas_side, 3), np.uint8), spec((batch, 2), np.int32)))):
    setup = step_lib.make_step_setup(config, 1, tx, **kwargs)
    state, _ = bench_train.abstract_step_inputs(config, setup, mesh)
    start = time.perf_counter()
    step = step_lib.make_sharded_step(setup, lr, mesh)
    compiled = step.lower(state, *inputs, indices).compile()
    seconds = time.perf_counter() - start
    results.append({'input': name, 'step_gflop_per_image': flops(compiled) / 1e9,
                    'compile_s': seconds})
  # The augmentation alone (the part that differs), per image (two views).
  aug, key = config.aug, jax.random.key(0)
  ids = jnp.arange(batch)
  crops = jax.ShapeDtypeStruct((batch, 2, size, size, 3), np.uint8)
  canvases = jax.ShapeDtypeStruct((batch, canvas_side, canvas_side, 3), np.uint8)
  sizes = jax.ShapeDtypeStruct((batch, 2), np.int32)
  from_crops = jax.jit(functools.partial(augment.two_views_from_crops, aug_config=aug,
                                         image_size=size))
  from_canvas = jax.jit(functools.partial(augment.two_views_from_canvas, aug_config=aug,
                                          image_size=size))
  results[0]['aug_gflop_per_image'] = flops(from_crops.lower(key, crops, ids).compile()) / 1e9
  results[1]['aug_gflop_per_image'] = flops(
      from_canvas.lower(key, canvases, sizes, ids).compile()) / 1e9
  return results


def flops(args):
  results = step_flops(args.preset, args.batch, args.canvas_side, args.dtype)
  print(f'preset={args.preset} batch={args.batch} canvas={args.canvas_side} dtype={args.dtype} '
        '(XLA cost analysis of the compiled program, 1 device)')
  print('| step input | step GFLOP/img | of which augmentation GFLOP/img | compile s |')
  print('| --- | --- | --- | --- |')
  for r in results:
    print(f'| {r["input"]} | {r["step_gflop_per_image"]:.3f} | {r["aug_gflop_per_image"]:.3f} | '
          f'{r["compile_s"]:.0f} |')
  a, b = results
  print(f'Device crops add {b["step_gflop_per_image"] - a["step_gflop_per_image"]:.3f} GFLOP/img '
        f'({100 * (b["step_gflop_per_image"] / a["step_gflop_per_image"] - 1):.1f}% of the step).')
  return results


# --------------------------------------------------------------------------
# Memory.


def _tree_rss(pid: int) -> int:
  """Resident bytes of `pid` and all its descendants."""
  import psutil  # pylint: disable=g-import-not-at-top
  try:
    proc = psutil.Process(pid)
    procs = [proc] + proc.children(recursive=True)
  except psutil.NoSuchProcess:
    return 0
  total = 0
  for p in procs:
    try:
      total += p.memory_info().rss
    except psutil.NoSuchProcess:
      pass
  return total


def measure_run(command: list, env: dict) -> dict:
  """Runs `command`, sampling the RSS of its process tree every 50 ms; peak bytes."""
  proc = subprocess.Popen(command, cwd=_ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  peak = 0
  while proc.poll() is None:
    peak = max(peak, _tree_rss(proc.pid))
    time.sleep(0.05)
  log = proc.stdout.read()
  if proc.returncode:
    raise RuntimeError(f'{command} failed:\n{log[-4000:]}')
  return {'peak_rss_bytes': peak, 'log': log}


def memory(args):
  sizes = [int(s) for s in args.sizes.split(',')]
  rows = []
  for num in sizes:
    tree = os.path.join(args.out, f'tree_{num}')
    if not os.path.isdir(tree):
      generate(tree, num, classes=args.classes, small=True)
    workdir = tempfile.mkdtemp(prefix='bench_stream_mem_')
    command = ['nice', '-n', str(args.nice), sys.executable, 'main.py',
               '--config=configs/imagenet.py', f'--workdir={workdir}',
               f'--config.data.path={tree}', '--config.model.name=resnet_tiny',
               '--config.model.width=8', '--config.data.image_size=64',
               f'--config.batch_size={args.batch}', '--config.moco.queue_size=256',
               f'--config.num_train_steps={args.steps}', '--config.log_every_steps=1',
               f'--config.data.max_in_memory_gb={args.budget_gb}',
               f'--config.data.stream_processes={args.processes}',
               f'--config.data.cache_dir={os.path.join(args.out, "cache")}']
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    result = measure_run(command, env)
    decoded = num * 256 * 256 * 3  # configs/imagenet.py: cache_size 256.
    streamed = 'streaming it' in result['log']
    rows.append((num, decoded, streamed, result['peak_rss_bytes']))
    print(f'{num} images: decoded {decoded / 2**30:.2f} GiB at 256 px, '
          f'streamed={streamed}, peak RSS {result["peak_rss_bytes"] / 2**30:.2f} GiB', flush=True)
  print('| images | decoded at 256 px | budget | path | peak RSS (process tree) |')
  print('| --- | --- | --- | --- | --- |')
  for num, decoded, streamed, peak in rows:
    print(f'| {num:,} | {decoded / 2**30:.2f} GiB | {args.budget_gb} GiB | '
          f'{"stream" if streamed else "memory"} | {peak / 2**30:.2f} GiB |')
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest='command', required=True)
  g = sub.add_parser('generate')
  g.add_argument('--out', required=True)
  g.add_argument('--num', type=int, default=10000)
  g.add_argument('--classes', type=int, default=100)
  g.add_argument('--split', default='train', help='Folder of the split (train, val).')
  g.add_argument('--seed', type=int, default=0, help='Another seed for another split.')
  g.add_argument('--unique', type=int, default=0,
                 help='Draw only this many images; the rest are byte copies (0: all drawn).')
  h = sub.add_parser('host')
  h.add_argument('--data', required=True)
  h.add_argument('--cores', type=int, default=1)
  h.add_argument('--batch', type=int, default=64)
  h.add_argument('--steps', type=int, default=20)
  h.add_argument('--warmup', type=int, default=3)
  h.add_argument('--size', type=int, default=224)
  h.add_argument('--rounds', type=int, default=1)
  h.add_argument('--loop', type=int, default=0,
                 help='also time N images of rows a and b in a bare loop (no loader, one core)')
  h.add_argument('--peer_python', '--torch_python', dest='peer_python', default='',
                 help='python of a venv with torch + torchvision (row d)')
  h.add_argument('--canvas_side', type=int, default=0,
                 help='row b\'s canvas; 0: auto, as training (512; the packed row: 384)')
  h.add_argument('--simplejpeg', action='store_true',
                 help='also rows b and c with data.decoder=simplejpeg')
  h.add_argument('--nice', type=int, default=10)
  fl = sub.add_parser('flops')
  fl.add_argument('--preset', default='r50_224')
  fl.add_argument('--batch', type=int, default=8)
  fl.add_argument('--canvas_side', type=int, default=512)
  fl.add_argument('--dtype', default='bfloat16')
  m = sub.add_parser('memory')
  m.add_argument('--out', required=True)
  m.add_argument('--sizes', default='2500,10000')
  m.add_argument('--classes', type=int, default=1000)
  m.add_argument('--budget_gb', type=float, default=0.25)
  m.add_argument('--batch', type=int, default=32)
  m.add_argument('--steps', type=int, default=5)
  m.add_argument('--processes', type=int, default=1)
  m.add_argument('--nice', type=int, default=10)
  args = parser.parse_args()
  if args.command == 'generate':
    generate(args.out, args.num, args.classes, seed=args.seed, split=args.split,
             unique=args.unique)
  elif args.command == 'host':
    host(args)
  elif args.command == 'flops':
    flops(args)
  else:
    memory(args)


if __name__ == '__main__':
  main()
