"""Streamed evaluation (issue 20): peak RSS and wall time of each evaluation mode on a large folder.

  # 1. An ImageNet-layout folder (1,000 classes x 20 train + 2 val JPEGs, ~500x375), never committed:
  python benchmarks/bench_stream.py generate --out=/tmp/inet20k --num=20000 --classes=1000
  python benchmarks/bench_stream.py generate --out=/tmp/inet20k --num=2000 --classes=1000 \
      --split=val --seed=1
  # 2. Pretrain a few steps streamed, then time and measure every evaluation mode:
  python benchmarks/bench_stream_eval.py --data=/tmp/inet20k --out=/tmp/stream_eval

Every run is `python main.py` in a fresh process (configs/imagenet.py, a tiny
ResNet, `data.max_in_memory_gb` = --budget_gb), its peak RSS sampled over its
process tree every 50 ms (`bench_stream.measure_run`). The modes run in this
order on one workdir:
  knn          cold: streams both splits into WORKDIR/features (float16), then the
               blockwise kNN;
  linear_eval  the standardized protocol, warm: on the features knn stored (the
               same weights and config), or cold with --cold_linear;
  linear_raw   warm: the raw protocol on the same stored features;
  report       the report on a fixed subset of the train split.
The per-image extraction time of the cold kNN run (from its log) and the
feature file's size give the ImageNet projection printed at the end.
"""

import argparse
import json
import os
import re
import shutil
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, 'benchmarks'))
import bench_stream  # pylint: disable=g-import-not-at-top,wrong-import-position


def _command(args, workdir, mode, extra=()):
  return (['nice', '-n', str(args.nice), sys.executable, 'main.py',
           '--config=configs/imagenet.py', f'--workdir={workdir}', f'--mode={mode}',
           f'--config.data.path={args.data}', '--config.model.name=resnet_tiny',
           '--config.model.width=8', f'--config.batch_size={args.batch}',
           '--config.moco.queue_size=256', f'--config.num_train_steps={args.steps}',
           '--config.log_every_steps=1', f'--config.data.max_in_memory_gb={args.budget_gb}',
           f'--config.data.stream_processes={args.processes}',
           f'--config.data.num_workers={args.threads}',
           f'--config.eval.linear_epochs={args.linear_epochs}',
           f'--config.data.cache_dir={os.path.join(args.out, "cache")}'] + list(extra))


def _timed(args, workdir, mode, extra=()):
  start = time.perf_counter()
  result = bench_stream.measure_run(_command(args, workdir, mode, extra),
                                    dict(os.environ, JAX_PLATFORMS='cpu'))
  result['wall_s'] = time.perf_counter() - start
  print(f'{mode} {" ".join(extra)}: peak RSS {result["peak_rss_bytes"] / 2**30:.2f} GiB, '
        f'{result["wall_s"]:.0f} s', flush=True)
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data', required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--budget_gb', type=float, default=1.0)
  parser.add_argument('--steps', type=int, default=4)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--processes', type=int, default=1)
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--linear_epochs', type=int, default=100)
  parser.add_argument('--nice', type=int, default=10)
  parser.add_argument('--cold_linear', action='store_true',
                      help='Delete the stored features before linear_eval (it extracts again).')
  parser.add_argument('--modes', default='knn,linear_eval,linear_raw,report',
                      help='which evaluations to run, in this order (train runs first when the '
                      'workdir has no checkpoint); linear_* reuse knn\'s features when it ran')
  args = parser.parse_args()
  modes = args.modes.split(',')
  workdir = os.path.join(args.out, 'run')
  rows = {}
  if not os.path.exists(os.path.join(workdir, 'checkpoints')):
    rows['train'] = _timed(args, workdir, 'train')
  features_dir = os.path.join(workdir, 'features')
  disk, stored = 0, []
  if 'knn' in modes:
    rows['knn'] = _timed(args, workdir, 'knn')
    disk = sum(os.path.getsize(os.path.join(features_dir, f)) for f in os.listdir(features_dir))
    log = rows['knn']['log']
    stored = re.findall(r'Stored (\d+) x (\d+) (\w+) features .* in ([\d.]+) s', log)
  if args.cold_linear and os.path.isdir(features_dir):  # Else linear_eval reuses knn's features.
    shutil.rmtree(features_dir)
  if 'linear_eval' in modes:
    rows['linear_eval'] = _timed(args, workdir, 'linear_eval')
  if 'linear_raw' in modes:
    rows['linear_raw'] = _timed(args, workdir, 'linear_eval',
                                ['--config.eval.linear_protocol=raw'])
  if 'report' in modes:
    rows['report'] = _timed(args, workdir, 'report')
  print('| mode | peak RSS (process tree) | wall time |')
  print('| --- | --- | --- |')
  for name, row in rows.items():
    print(f'| {name} | {row["peak_rss_bytes"] / 2**30:.2f} GiB | {row["wall_s"]:.0f} s |')
  print(f'features on disk: {disk / 2**20:.1f} MiB; stored: {stored}')
  for count, dim, split, seconds in stored:
    per_image = float(seconds) / int(count)
    print(f'{split}: {per_image * 1e3:.2f} ms per image here (extraction incl. decode); '
          f'{int(dim) * 2} bytes per image on disk; ImageNet train (1,281,167) at ResNet-50 '
          f'width 2048: {1281167 * 2048 * 2 / 1e9:.2f} GB')
  summary = {name: {'peak_rss_bytes': row['peak_rss_bytes'], 'wall_s': row['wall_s']}
             for name, row in rows.items()}
  summary['features_disk_bytes'] = disk
  summary['stored'] = stored
  with open(os.path.join(args.out, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  for name, row in rows.items():
    with open(os.path.join(args.out, f'{name}.log'), 'w') as f:
      f.write(row['log'])


if __name__ == '__main__':
  main()
