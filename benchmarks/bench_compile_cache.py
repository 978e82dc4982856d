"""Time to the first step with a cold and a warm persistent compilation cache.

  python benchmarks/bench_compile_cache.py --data=../shared/data/CIFAR-10-images.tar.gz

Runs `python main.py --config=configs/cifar10_cpu.py` as a user does, in
subprocesses (each one a fresh JAX): a 2-step run with the cache off makes a
checkpoint (and the decoded-array cache, so decoding is not timed); then

  resume   the run resumed for one more step: seconds from the command's start
           to its first metrics row (start-up, restore, compile, the step);
  knn      `--mode=knn` of that checkpoint: seconds to its result (start-up,
           restore, compile, features of the 60,000 images, the vote);

each first with an empty `config.compile_cache_dir` (cold), then again with the
directory the cold command filled (warm). Prints one JSON row per command.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  for name in ('JAX_COMPILATION_CACHE_DIR', 'JAX_COMPILATION_CACHE_MAX_SIZE',
               'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS',
               'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'):
    env.pop(name, None)  # The config field alone decides, with JAX's defaults.
  return env


def _main(workdir, flags, wait_for=None):
  """Runs main.py; returns (seconds until `wait_for()` first holds, or to the exit; total)."""
  start = time.perf_counter()
  proc = subprocess.Popen([sys.executable, 'main.py', f'--workdir={workdir}', *flags], cwd=ROOT,
                          env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  first = None
  while proc.poll() is None:
    if first is None and wait_for is not None and wait_for():
      first = time.perf_counter() - start
    time.sleep(0.05)
  stderr = proc.stderr.read()
  total = time.perf_counter() - start
  if proc.returncode:
    raise RuntimeError(f'main.py {" ".join(flags)} exited {proc.returncode}:\n{stderr[-3000:]}')
  if first is None and wait_for is not None and wait_for():
    first = total
  return (total if first is None else first), total


def _rows(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith('\n')]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--data', default=os.path.join(ROOT, '..', 'shared', 'data',
                                                     'CIFAR-10-images.tar.gz'))
  parser.add_argument('--keep', action='store_true', help='Keep the temporary directory.')
  args = parser.parse_args()
  base = tempfile.mkdtemp(prefix='bench_compile_cache_')
  common = ['--config=configs/cifar10_cpu.py', f'--config.data.path={os.path.abspath(args.data)}',
            f'--config.data.cache_dir={base}/decoded', '--config.log_every_steps=1',
            '--config.eval.knn_every_epochs=-1', '--config.tensorboard=False']
  try:
    seed = os.path.join(base, 'seed')
    _main(seed, [*common, '--config.num_train_steps=2', '--config.checkpoint_every_steps=2',
                 '--config.compile_cache_dir='])
    for what in ('resume', 'knn'):
      cache = os.path.join(base, f'cache_{what}')
      for state in ('cold', 'warm'):
        workdir = os.path.join(base, f'{what}_{state}')
        shutil.copytree(seed, workdir)
        if what == 'resume':
          flags = [*common, '--config.num_train_steps=3', '--config.checkpoint_every_steps=3',
                   f'--config.compile_cache_dir={cache}']
          wait = lambda w=workdir: any(r.get('step') == 3 for r in _rows(w))
        else:
          flags = ['--mode=knn', f'--config.compile_cache_dir={cache}']
          wait = None
        first, total = _main(workdir, flags, wait)
        entries = len([n for n in os.listdir(cache) if n.endswith('-cache')])
        print(json.dumps({'command': what, 'cache': state, 'first_step_s': round(first, 1),
                          'process_s': round(total, 1), 'cache_entries': entries}), flush=True)
  finally:
    if not args.keep:
      shutil.rmtree(base, ignore_errors=True)


if __name__ == '__main__':
  main()
