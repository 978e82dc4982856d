"""Reruns `python main.py` on a run whose latest checkpoint is corrupt, many times: is it quiet?

  python tools/corrupt_reruns.py [--repeats 3] [--devices 1] > table.md   # ~8 s a rerun on 2 cores

Issue 32, item 10: a 1-device configs/tiny.py run, its latest checkpoint
damaged by one of `CORRUPTIONS`, then the same command again: the rerun must
fall back to the checkpoint before it with one warning, finish with exit 0,
and print no traceback (Orbax's asynchronous chunk reads once printed ~3,700
lines one time in four). Each rerun starts from a fresh copy of the finished
run, so every repeat meets the same damage. Prints one row per rerun and a
summary. `CORRUPTIONS` are shared: tests/test_refusals.py reruns main.py on
each of them, and tools/bad_inputs.py's checkpoint cases use `garbage_chunks`.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ['--config=configs/tiny.py', '--config.num_train_steps=4', '--config.checkpoint_every_steps=2',
       '--config.log_every_steps=1', '--config.tensorboard=False']


def _files(step_dir):
  return [(os.path.getsize(os.path.join(d, n)), os.path.join(d, n))
          for d, _, names in os.walk(step_dir) for n in names]


def zero_largest(step_dir):
  size, path = max(_files(step_dir))
  with open(path, 'wb') as f:
    f.write(b'\0' * size)


def truncate_largest(step_dir):
  size, path = max(_files(step_dir))
  with open(path, 'r+b') as f:
    f.truncate(size // 2)


def garbage_chunks(step_dir):
  for size, path in _files(step_dir):
    if os.path.basename(os.path.dirname(path)) == 'd':
      with open(path, 'wb') as f:
        f.write(b'\0garbage' * (size // 8 + 1))


def delete_largest(step_dir):
  os.remove(max(_files(step_dir))[1])


CORRUPTIONS = (zero_largest, truncate_largest, garbage_chunks, delete_largest)


def _main(args, devices):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  start = time.time()
  proc = subprocess.run([sys.executable, 'main.py', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900)
  return proc, time.time() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=3, help='reruns per corruption pattern')
  parser.add_argument('--devices', type=int, default=1)
  args = parser.parse_args()
  tmp = tempfile.mkdtemp(prefix='corrupt_reruns_')
  try:
    finished = os.path.join(tmp, 'finished')
    proc, _ = _main([f'--workdir={finished}', *RUN], args.devices)
    if proc.returncode:
      sys.exit(f'the first run failed ({proc.returncode}): {proc.stderr[-2000:]}')
    print('| # | corruption | exit | stderr lines | tracebacks | fell back | time |')
    print('| --- | --- | --- | --- | --- | --- | --- |')
    quiet = n = 0
    for corrupt in CORRUPTIONS:
      for _ in range(args.repeats):
        n += 1
        workdir = os.path.join(tmp, f'rerun{n}')
        shutil.copytree(finished, workdir)
        corrupt(os.path.join(workdir, 'checkpoints', '4'))
        proc, seconds = _main([f'--workdir={workdir}', *RUN], args.devices)
        lines = proc.stderr.splitlines()
        tracebacks = sum('Traceback' in line for line in lines)
        fell_back = any('does not restore' in line for line in lines)
        ok = proc.returncode == 0 and not tracebacks and fell_back
        quiet += ok
        print(f'| {n} | {corrupt.__name__} | {proc.returncode} | {len(lines)} | {tracebacks} | '
              f'{"yes" if fell_back else "NO"} | {seconds:.0f} s |', flush=True)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f'\n{quiet} of {n} reruns fell back quietly (exit 0, one warning, no traceback).')
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
  main()
