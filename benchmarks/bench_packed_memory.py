"""Peak host RSS of --mode=pack and of every mode on the packed copy, under a 1 GiB budget (issue 29).

  python benchmarks/bench_packed_memory.py --out=/tmp/packed_mem [--num=20000] [--modes=...]

Generates an ImageNet-layout folder (`bench_stream.generate`: photo-like
JPEGs of ImageNet's sizes; `--unique` drawn, the rest byte copies with the
same decode cost) of `--num` train and `--val` val images, packs it with
`python main.py --mode=pack`, then runs each mode on the packed directory with
`data.max_in_memory_gb=1` (the 20,000 images decode to 3.66 GiB at 256 px, so
the train split is streamed) and a tiny model (resnet_tiny width 8 at 64 px,
decoded at 256 px), sampling the RSS of each process tree every 50 ms
(`bench_stream.measure_run`). Prints one table row per command.
"""

import argparse
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path.insert(0, _HERE)
import bench_stream  # pylint: disable=g-import-not-at-top,wrong-import-position

MODES = ('pack', 'train', 'knn', 'linear_eval', 'linear_paper', 'report', 'export')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', required=True)
  parser.add_argument('--num', type=int, default=20000)
  parser.add_argument('--val', type=int, default=1000)
  parser.add_argument('--unique', type=int, default=500)
  parser.add_argument('--classes', type=int, default=100)
  parser.add_argument('--budget_gb', type=float, default=1.0)
  parser.add_argument('--modes', default=','.join(MODES))
  parser.add_argument('--nice', type=int, default=10)
  args = parser.parse_args()
  tree, packed, workdir = (os.path.join(args.out, n) for n in ('tree', 'packed', 'run'))
  if not os.path.isdir(os.path.join(tree, 'val')):
    bench_stream.generate(tree, args.num, args.classes, unique=args.unique)
    bench_stream.generate(tree, args.val, args.classes, seed=1, split='val',
                          unique=min(args.unique, args.val))
  common = ['--config=configs/imagenet.py', '--config.model.name=resnet_tiny',
            '--config.model.width=8', '--config.data.image_size=64',
            '--config.data.cache_size=256', '--config.batch_size=32',
            '--config.moco.queue_size=256', '--config.tensorboard=False',
            f'--config.data.max_in_memory_gb={args.budget_gb}',
            f'--config.data.cache_dir={os.path.join(args.out, "cache")}',
            '--config.eval.batch_size=256', '--config.eval.linear_epochs=1',
            '--config.eval.linear_batch_size=256']
  on_packed = [*common, f'--config.data.path={packed}', f'--workdir={workdir}']
  commands = {
      'pack': ['--mode=pack', *common, f'--config.data.path={tree}', f'--workdir={packed}'],
      'train': [*on_packed, '--config.num_train_steps=20', '--config.log_every_steps=5',
                '--config.eval.knn_every_epochs=0'],
      'knn': ['--mode=knn', *on_packed],
      'linear_eval': ['--mode=linear_eval', *on_packed],
      'linear_paper': ['--mode=linear_eval', *on_packed, '--config.eval.linear_protocol=paper'],
      'report': ['--mode=report', *on_packed],
      'export': ['--mode=export', *on_packed],
  }
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  rows = []
  for mode in args.modes.split(','):
    start = time.time()
    result = bench_stream.measure_run(
        ['nice', '-n', str(args.nice), sys.executable, 'main.py', *commands[mode]], env)
    streamed = 'streaming it' in result['log'] or 'is streamed' in result['log']
    rows.append((mode, result['peak_rss_bytes'], time.time() - start, streamed))
    print(f'{mode}: peak RSS {result["peak_rss_bytes"] / 2**30:.2f} GiB, '
          f'{time.time() - start:.0f} s, streamed={streamed}', flush=True)
  print(f'\n{args.num:,} train + {args.val:,} val images, data.max_in_memory_gb={args.budget_gb}; '
        f'load avg {os.getloadavg()[0]:.1f}')
  print('| command | peak RSS (process tree) | seconds | train split streamed |')
  print('| --- | --- | --- | --- |')
  for mode, peak, seconds, streamed in rows:
    print(f'| {mode} | {peak / 2**30:.2f} GiB | {seconds:.0f} | {streamed} |')


if __name__ == '__main__':
  main()
