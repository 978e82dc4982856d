"""Row (c) of `bench_stream.py host` (issue 29): packed shards, random read + decode, per core.

  python benchmarks/bench_stream.py generate --out=/tmp/inet_like --num=2000 --unique=400
  python benchmarks/bench_packed.py --data=/tmp/inet_like --cores=1   # rows a and c, one run
  # The GPU check's stage: pack an archive, streamed train step vs synthetic data (JSON line):
  python benchmarks/bench_packed.py --step_archive=.data/imagenette2-128sq.tgz

The host work of training from a packed directory with the crops on the device:
each example is one random read of an ArrayRecord record (grain's
ArrayRecordDataSource, through `moco_jax.data.packed.PackedReader`) and one
Pillow decode of its JPEG (short side <= data.pack_side = 256) into a fixed
`canvas_side` canvas with its true (h, w), as row b's canvas loader does for
JPEG files; no crop and no resize on the host. The examples are read in the
training order (`batching.train_indices`), by `cores` grain worker processes
pinned with this process to `cores` CPUs, like every other row.

`row_c` plugs into `bench_stream.HOST_ROWS` (args -> (name, call, python)); the
packed copy of `--data` is made once beside it (`<data>_packed`, --mode=pack's
code) before the timed process is pinned.
"""

import argparse
import os
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = 'c: packed shards'


def packed_copy(data: str) -> str:
  """`<data>_packed`: the packed copy of ImageFolder `data` (made once, verified after)."""
  sys.path.insert(0, _ROOT)
  from configs import default  # pylint: disable=g-import-not-at-top
  from moco_jax.data import pack  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.data.path = data
  config.data.num_workers = os.cpu_count() or 1
  config.data.cache_dir = os.path.join(tempfile.gettempdir(), 'bench_stream_cache')
  return pack.run_pack(config, data.rstrip('/') + '_packed')


class DecodeIntoCanvas:
  """Dataset index -> {'image': uint8 [C, C, 3] (top-left), 'size': int32 [2]} (picklable)."""

  def __init__(self, source, canvas_side: int):
    self.source, self.canvas_side = source, canvas_side

  def __call__(self, index: int) -> dict:
    import numpy as np  # pylint: disable=g-import-not-at-top
    from moco_jax.data import decode  # pylint: disable=g-import-not-at-top
    image, _ = decode.load_rgb(self.source.read(int(index)))
    pixels = np.asarray(image)[:self.canvas_side, :self.canvas_side]
    canvas = np.zeros((self.canvas_side, self.canvas_side, 3), np.uint8)
    canvas[:pixels.shape[0], :pixels.shape[1]] = pixels
    return {'image': canvas, 'size': np.asarray(pixels.shape[:2], np.int32)}


def run_packed(data: str, cores: int, batch: int, steps: int, warmup: int, size: int,
               canvas_side: int = 512) -> dict:
  """Row c: `cores` grain worker processes read + decode packed records into canvases."""
  del size  # The crops (and their size) are the device's work on this path.
  root = packed_copy(data)
  os.sched_setaffinity(0, set(range(cores)))
  import grain.python as grain  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  from moco_jax.data import batching  # pylint: disable=g-import-not-at-top
  from moco_jax.data import sources  # pylint: disable=g-import-not-at-top
  from moco_jax.data import spec  # pylint: disable=g-import-not-at-top
  config = default.get_config().data
  config.path = root
  source = sources.open_source(spec.from_config(config)).open('train')
  n, total = len(source), (warmup + steps) * batch
  order = np.concatenate([batching.train_indices(n, batch, 0, s) for s in range(warmup + steps)])
  ds = grain.MapDataset.source(order[:total].tolist()).map(DecodeIntoCanvas(source, canvas_side))
  it = ds.batch(batch, drop_remainder=True).to_iter_dataset(grain.ReadOptions(num_threads=1))
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  it = iter(it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cores,
                                                        per_worker_buffer_size=2)))
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(steps):
    out = next(it)
  seconds = time.perf_counter() - start
  assert out['image'].shape == (batch, canvas_side, canvas_side, 3)
  it.close()
  return {'loader': NAME, 'images_per_sec': steps * batch / seconds}


def row_c(args):
  """bench_stream.HOST_ROWS entry: (name, call over `b` = bench_stream, python)."""
  common = f'{args.data!r}, {args.cores}, {args.batch}, {args.steps}, {args.warmup}, {args.size}'
  canvas = getattr(args, 'canvas_side', 512)
  return NAME, f'__import__("bench_packed").run_packed({common}, {canvas})', sys.executable


def _train_rate(command: list, workdir: str) -> dict:
  """Runs a main.py training command; img/s of its logged intervals (compilation left out)."""
  import json  # pylint: disable=g-import-not-at-top
  import statistics  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  proc = subprocess.run(command, cwd=_ROOT, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f'{" ".join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  rates = [r['images_per_sec'] for r in rows if 'images_per_sec' in r]
  if not rates:
    raise RuntimeError(f'no img/s row in {workdir}/metrics.jsonl')
  return {'images_per_second': statistics.median(rates), 'intervals': len(rates),
          'seconds': round(time.perf_counter() - start, 1)}


def step_vs_synthetic(archive: str, tmp: str, config: str, steps: int, log_every: int,
                      extra: list) -> dict:
  """Packs `archive`, then the full streamed training step (input included) vs synthetic data.

  Both runs are `python main.py` with the same config, batch and step; the
  packed one streams the shards (data.max_in_memory_gb=0: the host reads,
  decodes and hands over every batch), the synthetic one keeps random images
  on the device (data.on_device: no host input at all), so the ratio is the
  share of the accelerator's speed that the host's input keeps.
  """
  py = sys.executable
  main_py = os.path.join(_ROOT, 'main.py')
  packed_dir = os.path.join(tmp, 'packed')
  common = [f'--config={config}', '--config.tensorboard=False',
            f'--config.num_train_steps={steps}', f'--config.log_every_steps={log_every}',
            '--config.checkpoint_every_steps=1000000', '--config.eval.knn_every_epochs=0',
            f'--config.data.cache_dir={os.path.join(tmp, "cache")}', *extra]
  import subprocess  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  proc = subprocess.run([py, main_py, '--mode=pack', *common, f'--config.data.path={archive}',
                         f'--workdir={packed_dir}'], cwd=_ROOT, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f'pack failed ({proc.returncode}):\n{proc.stderr[-3000:]}')
  result = {'pack_seconds': round(time.perf_counter() - start, 1)}
  result['packed'] = _train_rate(
      [py, main_py, *common, f'--config.data.path={packed_dir}',
       '--config.data.max_in_memory_gb=0', f'--workdir={os.path.join(tmp, "w_packed")}'],
      os.path.join(tmp, 'w_packed'))
  result['synthetic'] = _train_rate(
      [py, main_py, *common, '--config.data.source=synthetic', '--config.data.on_device=True',
       f'--workdir={os.path.join(tmp, "w_synth")}'], os.path.join(tmp, 'w_synth'))
  result['images_per_second'] = result['packed']['images_per_second']
  result['packed_over_synthetic'] = (result['packed']['images_per_second']
                                     / result['synthetic']['images_per_second'])
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--step_archive', default='',
                      help='measure the streamed train step from a packed copy of this archive '
                      'against synthetic data instead (benchmarks/gpu_check.py stage '
                      'packed_stream; prints one JSON line)')
  parser.add_argument('--step_config', default=os.path.join(_ROOT, 'configs', 'imagenet.py'))
  parser.add_argument('--step_steps', type=int, default=40)
  parser.add_argument('--step_log_every', type=int, default=10)
  parser.add_argument('--data', default='')
  parser.add_argument('--cores', type=int, default=1)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--size', type=int, default=224)
  parser.add_argument('--canvas_side', type=int, default=512)
  parser.add_argument('--rounds', type=int, default=1)
  parser.add_argument('--nice', type=int, default=10)
  args, extra = parser.parse_known_args()
  if args.step_archive:  # Unknown arguments (--config.a.b=v) go to both runs.
    import json  # pylint: disable=g-import-not-at-top
    with tempfile.TemporaryDirectory(prefix='packed_step_') as tmp:
      print(json.dumps(step_vs_synthetic(args.step_archive, tmp, args.step_config,
                                         args.step_steps, args.step_log_every, extra)))
    return
  if extra or not args.data:
    parser.error(f'--data is required (unknown: {extra})')
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import bench_stream  # pylint: disable=g-import-not-at-top
  packed_copy(args.data)  # Outside the timed, pinned processes.
  common = f'{args.data!r}, {args.cores}, {args.batch}, {args.steps}, {args.warmup}, {args.size}'
  best = {}
  for _ in range(args.rounds):  # Alternating, so both rows see the same load.
    for call in (f'b.run_ours({common})', row_c(args)[1]):
      fresh = getattr(bench_stream, '_fresh', None)
      row = (fresh(call, sys.executable, args.nice) if fresh else
             _fresh_here(call, args.nice))
      best[row['loader']] = max(best.get(row['loader'], 0.0), row['images_per_sec'])
  load = os.getloadavg()
  print(f'cores={args.cores} batch={args.batch} steps={args.steps} canvas={args.canvas_side} '
        f'rounds={args.rounds} (best of rounds); load avg {load[0]:.1f}')
  print('| row | img/s | img/s per core |')
  print('| --- | --- | --- |')
  for name, ips in best.items():
    print(f'| {name} | {ips:.1f} | {ips / args.cores:.1f} |')
  names = list(best)
  print(f'| ({NAME[0]}) / ({names[0][0]}) per core | {best[NAME] / best[names[0]]:.2f}x | |')


def _fresh_here(call: str, nice: int) -> dict:
  """bench_stream's fresh-process runner, for a bench_stream without `_fresh`."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  code = (f'import sys, json; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); '
          f'import bench_stream as b\nif __name__ == "__main__":\n  print("RESULT", '
          f'json.dumps({call}))')
  script = os.path.join(tempfile.gettempdir(), f'bench_packed_{os.getpid()}.py')
  with open(script, 'w') as f:
    f.write(code)
  out = subprocess.run(['nice', '-n', str(nice), sys.executable, script], capture_output=True,
                       text=True, timeout=3600, cwd=_ROOT)
  lines = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')]
  if out.returncode or not lines:
    raise RuntimeError(f'{call} failed:\n{out.stderr[-4000:]}')
  return json.loads(lines[-1][len('RESULT '):])


if __name__ == '__main__':
  main()
