"""Input pipeline and augmentation throughput, and a torchvision side-by-side.

  python benchmarks/bench_input.py --append_docs
  python benchmarks/bench_input.py --peer_python=/tmp/peervenv/bin/python --append_docs

Measures, on real archives from ../shared/data:
  * host pipeline: `Source.load` with a cold cache (list the
    archive, decode every JPEG with Pillow threads, write the .npy cache) and a
    warm one (load the .npy), then `train_batches` images/s at batch 256. One
    image delivered = the source of both views (views are made on device).
  * augmentation: jit-compiled `augment.two_views` (MoCo v2 aug+) on this
    host's CPU, images/s (each image -> query + key view).
  * peer: torchvision's MoCo v2 transforms (RandomResizedCrop, ColorJitter,
    RandomGrayscale, GaussianBlur, flip, ToTensor, Normalize; two views) in a
    torch DataLoader over the same decoded images, run by `--peer_python` (a
    separate venv with torch/torchvision; torch is never a project dependency).

Numbers depend on the machine's load: the docs say where they were taken.
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
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from configs import default
from benchmarks import report
from moco_jax.augmentation import augment
from moco_jax.augmentation import image_ops
from moco_jax.data import batching
from moco_jax.data import sources
from moco_jax.data import spec

DOCS_PATH = report.DOCS_PATH
DATA = os.path.join(os.path.dirname(_ROOT), 'shared', 'data')
DATASETS = {  # name: (archive, decoded side S, view size)
    'imagenette 128px': ('imagenette2-128sq.tgz', 128, 128),
    'CIFAR-10 32px': ('CIFAR-10-images.tar.gz', 32, 32),
}

PEER_SCRIPT = r'''
import json, sys, time
import numpy as np, torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
import torchvision.transforms as T

a = json.loads(sys.argv[1])
torch.set_num_threads(1)
images = np.load(a['npy'])
aug = T.Compose([
    T.RandomResizedCrop(a['size'], scale=tuple(a['scale']), ratio=tuple(a['ratio'])),
    T.RandomApply([T.ColorJitter(*a['jitter'])], p=a['jitter_prob']),
    T.RandomGrayscale(p=a['grayscale_prob']),
    T.RandomApply([T.GaussianBlur(a['kernel'], sigma=tuple(a['sigma']))], p=a['blur_prob']),
    T.RandomHorizontalFlip(),
    T.ToTensor(),
    T.Normalize(a['mean'], a['std']),
])

class TwoViews(Dataset):
  def __len__(self):
    return len(images)
  def __getitem__(self, i):
    image = Image.fromarray(images[i])
    return aug(image), aug(image)

loader = DataLoader(TwoViews(), batch_size=a['batch'], shuffle=True, drop_last=True,
                    num_workers=a['workers'])
count, start = 0, None
for q, k in loader:
  if start is None:  # The first batch pays for starting the workers.
    start = time.perf_counter()
    continue
  count += q.shape[0]
print(json.dumps({'images_per_s': count / (time.perf_counter() - start), 'images': count,
                  'torch': torch.__version__}))
'''


INPUT_INTRO = """What the host does per run, and what `benchmarks/bench_input.py` times
(train split of the real archives in `../shared/data`, read as is):

- **Cold**: `Source.load` with an empty `data.cache_dir`. An
  archive is decompressed once: the same pass lists it (to find the split and
  class folders and check them) and hands the files of the wanted split to
  Pillow decode threads; each image is resized (shorter side to S, centre
  square) and the arrays are written to
  `<cache_dir>/<name>-<split>-<S>px-<key>.images.npy`. Imagenette's 128 px
  JPEGs are libjpeg-bound and use both cores; CIFAR-10's 1 KB JPEGs are bound
  by Pillow's per-file Python work (header parsing, object setup) under the
  GIL, so they decode at only ~2x Imagenette's rate per image although they
  are 16x smaller (a spawned process pool would scale, but breaks any
  caller script without a `__main__` guard; cold runs happen once per
  machine and S).
- **Warm**: the second run loads the `.npy` (0.1-2.5 s, depending on whether
  the page cache still holds it); the archive is only `stat`ed.
- **train_batches**: a prefetch thread gathers each step's rows with
  `np.take` (which releases the GIL) from the one uint8 array, two batches
  ahead. Tens to hundreds of thousands of images/s: far above what any
  accelerator step consumes, so the host never limits training once the
  cache is warm.

One image delivered = the source of both views: the views are cut on the
device.
"""

AUG_INTRO = """`augment.two_views` runs inside the jit-compiled, shard_map'ed train step,
vmapped over 2B examples (both views in one program: half the compile time).
Per view: RandomResizedCrop box (torchvision's 10 tries + centre fallback,
all tries drawn at once), crop+resize (two gather+lerp passes when the
cached side S <= image_size, i.e. every crop upsamples; an antialiased
`scale_and_translate` when S > image_size), ColorJitter in torchvision's
random order (6 masked blend slots around one fused RGB->HSV->RGB hue
rotation), grayscale, separable Gaussian blur (two small matmuls, reflect
padding, kernel ~10% of the image side), flip, normalise. All of a view's
random numbers come from one `jax.random.uniform` draw, which halved the
compile time of the augmentation.

Accelerator augmentation throughput: CPU only; GPU not lent to this task.
On the 2-core CPU one profile of 256 views at 128 px (each op jit'ed alone,
loaded machine) split the time as: blur ~40% (two 128x128 matmuls per view:
a dense banded matrix beat 13 shifted sums and a depthwise convolution on
XLA:CPU), colour jitter ~35% (half of it the hue rotation), crop ~10%,
flip/normalise/casts ~10%. XLA:CPU findings from A/B runs of the whole
`two_views` (same process, interleaved): `jnp.mod` lowers to a scalar libm
call (the hue op uses floor instead: hue alone ~2x faster); slicing the
3-long channel axis is slow, so the luma stays an `image @ weights` dot (a
weighted sum of channel slices made the views 2-3x slower, and so did a
planar [3, H, W] layout for all colour ops, and a slice-free hue via
one-hot/argmax was slower too). On a GPU these ops are memory-bound
elementwise kernels or batches of tiny matmuls.

The torchvision peer is the reference MoCo v2 recipe run the usual way: PIL
transforms in a `torch.utils.data.DataLoader` with one worker per core, over
the same decoded uint8 images (no JPEG decoding on either side). At 32 px
its per-call overheads dominate (GaussianBlur alone ~1.7 ms per PIL image,
ColorJitter ~0.9 ms). torch is installed only in a separate venv
(`python3 -m venv /tmp/peervenv && /tmp/peervenv/bin/pip install
torch==2.14.1 torchvision==0.29.1`), never in `requirements.txt`.
"""


def data_config(archive: str, side: int, cache_dir: str):
  config = default.get_config().data
  config.update(dict(path=os.path.join(DATA, archive), image_size=side, cache_size=side,
                     cache_dir=cache_dir, num_workers=os.cpu_count() or 2, eval_split='val'))
  return config


def bench_host(archive: str, side: int, cache_dir: str, batch: int, steps: int) -> dict:
  """Cold decode, warm cache load and batch gathering of the train split."""
  config = data_config(archive, side, cache_dir)
  start = time.perf_counter()
  ds = sources.open_source(spec.from_config(config)).load('train')
  cold = time.perf_counter() - start
  start = time.perf_counter()
  ds = sources.open_source(spec.from_config(config)).load('train')
  warm = time.perf_counter() - start
  batches = batching.train_batches(ds, global_batch=batch, seed=0)
  next(batches)
  start = time.perf_counter()
  checksum = 0
  for _ in range(steps):
    checksum += int(next(batches)['image'][-1, -1, -1, -1])
  gather = time.perf_counter() - start
  batches.close()
  return {'n': len(ds), 'cold_s': cold, 'cold_ips': len(ds) / cold, 'warm_s': warm,
          'warm_ips': len(ds) / warm, 'batch_ips': steps * batch / gather, 'ds': ds}


def bench_aug(images: np.ndarray, image_size: int, steps: int) -> dict:
  """jit'ed two_views on the default device: compile time and images/s."""
  aug = default.get_config().aug
  fn = jax.jit(lambda r, x, i: augment.two_views(r, x, i, aug, image_size))
  x = jnp.asarray(images)
  ids = jnp.arange(len(images))
  start = time.perf_counter()
  jax.block_until_ready(fn(jax.random.key(0), x, ids))
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for step in range(steps):
    out = fn(jax.random.key(step + 1), x, ids)
  jax.block_until_ready(out)
  return {'compile_s': compile_s, 'ips': steps * len(images) / (time.perf_counter() - start)}


def bench_peer(python: str, images: np.ndarray, image_size: int, batch: int) -> dict:
  """torchvision's MoCo v2 pipeline in a DataLoader, in another interpreter."""
  aug = default.get_config().aug
  with tempfile.TemporaryDirectory() as tmp:
    npy = os.path.join(tmp, 'images.npy')
    np.save(npy, images)
    args = {'npy': npy, 'size': image_size, 'scale': list(aug.crop_scale),
            'ratio': list(aug.crop_ratio), 'jitter': list(aug.jitter),
            'jitter_prob': aug.jitter_prob, 'grayscale_prob': aug.grayscale_prob,
            'kernel': image_ops.blur_kernel_size(image_size), 'sigma': list(aug.blur_sigma),
            'blur_prob': aug.blur_prob, 'mean': list(aug.mean), 'std': list(aug.std),
            'batch': batch, 'workers': os.cpu_count() or 2}
    out = subprocess.run([python, '-c', PEER_SCRIPT, json.dumps(args)], check=True,
                         capture_output=True, text=True, timeout=300)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=256, help='Global batch of every measurement.')
  parser.add_argument('--gather_steps', type=int, default=40, help='Batches timed per dataset.')
  parser.add_argument('--aug_steps', type=int, default=3, help='two_views calls timed.')
  parser.add_argument('--peer_python', default='/tmp/peervenv/bin/python',
                      help="Python of a venv with torch + torchvision ('' = skip the peer).")
  parser.add_argument('--peer_images', type=int, default=1280,
                      help='Images the peer DataLoader processes (first batch is warm-up).')
  parser.add_argument('--append_docs', action='store_true', help=f'Append to {DOCS_PATH}.')
  args = parser.parse_args(argv)

  peer = args.peer_python if args.peer_python and os.path.exists(args.peer_python) else ''
  host_rows, aug_rows = [], []
  cache_dir = tempfile.mkdtemp(prefix='bench_input_cache_')
  try:
    for name, (archive, side, size) in DATASETS.items():
      if not os.path.exists(os.path.join(DATA, archive)):
        print(f'skip {name}: {archive} not in {DATA}')
        continue
      host = bench_host(archive, side, cache_dir, args.batch, args.gather_steps)
      print(f'{name}: host {host}'.replace(repr(host['ds']), '...'))
      host_rows.append(f"| {name} | {host['n']:,} "
                       f"| {host['cold_s']:.1f} s ({host['cold_ips']:,.0f}/s) "
                       f"| {host['warm_s']:.2f} s ({host['warm_ips']:,.0f}/s) "
                       f"| {host['batch_ips']:,.0f} |")
      images = host['ds'].images[:args.batch]
      ours = bench_aug(images, size, args.aug_steps if side > 64 else 4 * args.aug_steps)
      print(f'{name}: two_views {ours}')
      theirs = {}
      if peer:
        pool = host['ds'].images[:args.peer_images * (1 if side > 64 else 4)]
        theirs = bench_peer(peer, pool, size, args.batch)
        print(f'{name}: torchvision {theirs}')
      peer_cell = (f"{theirs['images_per_s']:,.0f} | {ours['ips'] / theirs['images_per_s']:.2f}x"
                   if theirs else 'not measured | -')
      aug_rows.append(f"| {name} | {args.batch} | {ours['compile_s']:.1f} s | {ours['ips']:,.0f} "
                      f"| {peer_cell} |")
  finally:
    shutil.rmtree(cache_dir, ignore_errors=True)

  host_table = ['| dataset (train split) | images | cold: list + decode + write cache | '
                'warm: load cache | train_batches images/s |', '| --- | --- | --- | --- | --- |',
                *host_rows]
  aug_table = ['| data | batch | compile | two_views images/s (CPU, jit) | torchvision DataLoader '
               'images/s | ratio (ours / torchvision) |',
               '| --- | --- | --- | --- | --- | --- |', *aug_rows]
  print('\n'.join(host_table + [''] + aug_table))
  if args.append_docs:
    command = 'python benchmarks/bench_input.py ' + ' '.join(
        a for a in (sys.argv[1:] if argv is None else argv))
    env = report.environment_line()
    report.append_section('## Input pipeline', intro=INPUT_INTRO, block='\n'.join([
        f'Run: `{command.strip()}`', '', f'Environment: {env}.', '',
        f'Cold = first run (cache in a fresh temp dir, {os.cpu_count()} decode threads); warm = '
        'second run. One image = the source of both views.', '', *host_table, '']) + '\n')
    report.append_section('## Augmentation', intro=AUG_INTRO, block='\n'.join([
        f'Run: `{command.strip()}`', '', f'Environment: {env}.', '',
        'Accelerator augmentation throughput: CPU only; GPU not lent to this task. '
        'MoCo v2 aug+ (default `config.aug`), one image = query + key view. The torchvision '
        f'peer runs the same transforms with PIL in a DataLoader ({os.cpu_count()} workers) over '
        'the same decoded images, on the same cores.', '', *aug_table, '']) + '\n')


if __name__ == '__main__':
  main()
