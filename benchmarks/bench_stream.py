"""Streaming input benchmarks (issue 9): host throughput per core vs torchvision, and memory.

  # 1. ImageNet-like JPEGs (about 500x375, quality 90) in a temporary directory, never committed:
  python benchmarks/bench_stream.py generate --out=/tmp/inet_like --num=10000
  # 2. Host throughput: decode + two RandomResizedCrop views at 224 px, ours (grain) vs
  #    torchvision's ImageFolder + DataLoader, same cores, same files:
  python benchmarks/bench_stream.py host --data=/tmp/inet_like --cores=1 \
      --torch_python=/work/torchvenv/bin/python
  # 3. Peak host RSS of a short configs/imagenet.py run on two folder sizes:
  python benchmarks/bench_stream.py memory --sizes=2500,10000 --out=/tmp/mem_trees

`host` runs, each in a fresh process pinned to the same `--cores` CPUs
(sched_setaffinity), over the same files:
  ours        moco_jax.data.host_crops.train_batches with `cores` grain worker
              processes: decode (JPEG draft where the crops allow) + two
              RandomResizedCrop(224, scale=(0.2, 1)) views -> uint8
              [B, 2, 224, 224, 3]. Colour ops run later, on the accelerator.
  torch-crop  torchvision ImageFolder + DataLoader(num_workers=cores), each
              example two RandomResizedCrop(224, scale=(0.2, 1)) +
              PILToTensor views: the same host work as ours.
  torch-mocov2  the same with MoCo v2's full aug+ per view on the host (what
              the official main_moco.py runs): RandomResizedCrop, ColorJitter
              (p 0.8), RandomGrayscale (0.2), GaussianBlur (p 0.5),
              RandomHorizontalFlip, ToTensor, Normalize.
Throughput = images (each with its two views) per second after `--warmup`
batches, divided by the cores for per core. The torch side runs in its own
venv (`--torch_python`), never the project's.
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


def run_ours(data: str, cores: int, batch: int, steps: int, warmup: int, size: int) -> dict:
  """Our streaming loader: `cores` grain worker processes, pinned with this one to `cores` CPUs."""
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
                               crop_scale=(0.2, 1.0), num_threads=1, num_processes=cores,
                               prefetch=2)
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(steps):
    out = next(it)
  seconds = time.perf_counter() - start
  assert out['image'].shape == (batch, 2, size, size, 3)
  it.close()
  return {'loader': 'ours', 'images_per_sec': steps * batch / seconds}


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
  return {'loader': 'ours-loop', 'images_per_sec': images / (time.perf_counter() - start)}


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
  return {'loader': f'torch-{transform}', 'images_per_sec': steps * batch / seconds}


def host(args):
  rows = []
  torch_python = args.torch_python

  def fresh(call: str, python: str) -> dict:
    code = (f'import sys, json; sys.path.insert(0, {os.path.join(_ROOT, "benchmarks")!r}); '
            f'import bench_stream as b\nif __name__ == "__main__":\n  print("RESULT", '
            f'json.dumps({call}))')
    script = os.path.join(tempfile.gettempdir(), f'bench_stream_{os.getpid()}.py')
    with open(script, 'w') as f:
      f.write(code)
    out = subprocess.run(['nice', '-n', str(args.nice), python, script], capture_output=True,
                         text=True, timeout=3600, cwd=_ROOT)
    lines = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')]
    if out.returncode or not lines:
      raise RuntimeError(f'{call} failed:\n{out.stderr[-4000:]}')
    return json.loads(lines[-1][len('RESULT '):])

  common = f'{args.data!r}, {args.cores}, {args.batch}, {args.steps}, {args.warmup}, {args.size}'
  for _ in range(args.rounds):
    rows.append(fresh(f'b.run_ours({common})', sys.executable))
    if torch_python:
      for transform in ('crop', 'mocov2'):
        rows.append(fresh(f'b.run_torch({common}, {transform!r})', torch_python))
  if args.loop:
    rows.append(fresh(f'b.run_ours_loop({args.data!r}, {args.loop}, {args.size})',
                      sys.executable))
  best = {}
  for row in rows:
    best[row['loader']] = max(best.get(row['loader'], 0), row['images_per_sec'])
  load = os.getloadavg()
  print(f'cores={args.cores} batch={args.batch} steps={args.steps} size={args.size} '
        f'rounds={args.rounds} (best of rounds); load avg {load[0]:.1f}')
  print('| loader | cores | img/s | img/s per core | ours / this |')
  print('| --- | --- | --- | --- | --- |')
  for name, ips in best.items():
    cores = 1 if name == 'ours-loop' else args.cores
    ratio = best.get('ours', 0) / args.cores / (ips / cores)
    print(f'| {name} | {cores} | {ips:.1f} | {ips / cores:.1f} | {ratio:.2f}x |')
  per_core = best['ours'] / args.cores
  print(f'Cores to feed 5,000 img/s (one H100, two 224 px views each): '
        f'{5000 / per_core:.1f} at {per_core:.0f} img/s per core.')
  return best


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
  h.add_argument('--loop', type=int, default=0, help='also time N images in a bare loop')
  h.add_argument('--torch_python', default='')
  h.add_argument('--nice', type=int, default=10)
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
  else:
    memory(args)


if __name__ == '__main__':
  main()
