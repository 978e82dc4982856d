"""MoCo v1 Fig. 3 at small scale: kNN top-1 of end-to-end, memory bank and MoCo against K.

  nice -n 10 python benchmarks/mechanisms_fig3.py --archive=../shared/data/CIFAR-10-images.tar.gz \
      --out=/tmp/fig3 [--per_class=1000 --epochs=2]

Every point is `configs/mechanisms.py:<method>` (the CPU recipe of
`configs/cifar10_cpu.py`: tiny ResNet, 32 px) trained by `main.py` on the same
fixed subset of CIFAR-10 train (the first `per_class` files of each class, in
name order), the same epochs and seed, then `main.py --mode=knn` on the whole
test split; the floor is the step-0 encoder (`--config.eval.random_init`).
K is `moco.queue_size` for MoCo and `memory_bank.num_negatives` for the bank; for
end-to-end K = batch - 1, so its points are run at batch K (not K + 1: the 8
Shuffle-BN groups must divide the batch) where `--e2e_batches` lists them.
Points run one after another (each a fresh process); results go to
OUT/results.json, rewritten after every point, and then to the table and plot
of docs/mechanisms.md (`--plot`).
"""

import argparse
import json
import os
import subprocess
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_subset(archive: str, dest: str, per_class: int) -> str:
  """DEST/{train,test}/<class>/: the first `per_class` train files of each class, all test files."""
  if os.path.isdir(os.path.join(dest, 'train')):
    return dest
  counts = {}
  with tarfile.open(archive) as tar:
    for member in tar:
      parts = member.name.split('/')
      if not member.isfile() or len(parts) != 4 or parts[1] not in ('train', 'test'):
        continue
      split, cls = parts[1], parts[2]
      if split == 'train':
        counts.setdefault(cls, []).append(member)
        continue
      member.name = '/'.join(parts[1:])
      tar.extract(member, dest)
    for cls, members in counts.items():
      for member in sorted(members, key=lambda m: m.name)[:per_class]:
        member.name = '/'.join(member.name.split('/')[1:])
        tar.extract(member, dest)
  return dest


def run_point(method: str, k: int, data: str, out: str, epochs: int, batch: int) -> dict:
  """Trains one point and evaluates it with --mode=knn; returns its row."""
  workdir = os.path.join(out, f'{method}_k{k}')
  overrides = [f'--config.data.path={data}', f'--config.num_epochs={epochs}',
               '--config.eval.knn_every_epochs=-1', '--config.data.eval_split=test',
               f'--config.batch_size={batch}', '--config.tensorboard=False',
               f'--config.moco.queue_size={max(k, batch)}',
               f'--config.memory_bank.num_negatives={k}']
  base = [sys.executable, os.path.join(ROOT, 'main.py'),
          f'--config={os.path.join(ROOT, "configs/mechanisms.py")}:{method}',
          f'--workdir={workdir}']
  start = time.time()
  cpu = os.times()
  subprocess.run(base + overrides, check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                 stderr=open(os.path.join(out, f'{method}_k{k}.log'), 'w'))
  trained = time.time() - start
  subprocess.run(base + overrides + ['--mode=knn'], check=True, cwd=ROOT,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  after = os.times()
  with open(os.path.join(workdir, 'eval.json')) as f:
    top1 = json.load(f)['knn_top1']
  return {'method': method, 'K': k, 'batch': batch, 'knn_top1': top1, 'train_wall_s': trained,
          'cpu_s': (after.children_user + after.children_system
                    - cpu.children_user - cpu.children_system)}


def floor(data: str, out: str) -> float:
  workdir = os.path.join(out, 'random_init')
  subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), '--mode=knn',
                  f'--config={os.path.join(ROOT, "configs/mechanisms.py")}:moco',
                  f'--workdir={workdir}', f'--config.data.path={data}',
                  '--config.data.eval_split=test', '--config.eval.random_init=True'],
                 check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  with open(os.path.join(workdir, 'eval.json')) as f:
    return json.load(f)['random_init_knn_top1']


def plot(results: dict, path: str):
  """kNN top-1 against K (log axis), one line per mechanism, the floor dashed."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for method, marker in (('end_to_end', 's'), ('memory_bank', '^'), ('moco', 'o')):
    rows = sorted((r for r in results['points'] if r['method'] == method), key=lambda r: r['K'])
    if rows:
      ax.plot([r['K'] for r in rows], [r['knn_top1'] for r in rows], marker=marker, label=method)
  if 'floor' in results:
    ax.axhline(results['floor'], color='gray', linestyle='--', label='random init')
  ax.set_xscale('log', base=2)
  ax.set_xlabel('K (negatives)')
  ax.set_ylabel('kNN top-1 (%)')
  ax.set_title('CIFAR-10 subset, tiny ResNet (small-scale Fig. 3)')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--archive', default=os.path.join(ROOT, '../shared/data/CIFAR-10-images.tar.gz'))
  parser.add_argument('--out', default='/tmp/mechanisms_fig3')
  parser.add_argument('--per_class', type=int, default=1000)
  parser.add_argument('--epochs', type=int, default=2)
  parser.add_argument('--batch', type=int, default=128, help='MoCo and memory-bank batch.')
  parser.add_argument('--ks', default='256,1024,4096')
  parser.add_argument('--e2e_batches', default='256,1024',
                      help='End-to-end batches (K = batch - 1) to run.')
  parser.add_argument('--plot', default='', help='Only redraw OUT/results.json to this PNG.')
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  results_path = os.path.join(args.out, 'results.json')
  if args.plot:
    with open(results_path) as f:
      plot(json.load(f), args.plot)
    return
  data = make_subset(args.archive, os.path.join(args.out, 'data'), args.per_class)
  results = {'per_class': args.per_class, 'epochs': args.epochs, 'points': []}
  if os.path.exists(results_path):
    with open(results_path) as f:
      results = json.load(f)
  done = {(r['method'], r['K']) for r in results['points']}
  if 'floor' not in results:
    results['floor'] = floor(data, args.out)
  todo = [(m, int(k), args.batch) for k in args.ks.split(',') if k for m in ('moco', 'memory_bank')]
  todo += [('end_to_end', int(b), int(b)) for b in args.e2e_batches.split(',') if b]
  for method, k, batch in todo:
    if (method, k) in done:
      continue
    row = run_point(method, k, data, args.out, args.epochs, batch)
    print(json.dumps(row), flush=True)
    results['points'].append(row)
    with open(results_path, 'w') as f:
      json.dump(results, f, indent=1)
  with open(results_path, 'w') as f:
    json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
