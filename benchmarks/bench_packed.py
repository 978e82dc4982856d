"""Packed shards for the benchmarks (issue 29): the packed copy row (c) reads, and the GPU check's stage.

  # Row (c) of the host table is `bench_stream.py host` (it packs --data once, beside it):
  python benchmarks/bench_stream.py host --data=/tmp/inet_like --cores=1 --simplejpeg
  # The GPU check's stage: pack an archive, streamed train step vs synthetic data (JSON line):
  python benchmarks/bench_packed.py --step_archive=.data/imagenette2-128sq.tgz

`packed_copy(data)` packs an ImageFolder once into `<data>_packed` with
`--mode=pack`'s code (outside the timed, pinned processes); row (c) then runs
the canvas loader on it as training does (`bench_stream.run_canvas`).
"""

import argparse
import os
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
  args, extra = parser.parse_known_args()
  if args.step_archive:  # Unknown arguments (--config.a.b=v) go to both runs.
    import json  # pylint: disable=g-import-not-at-top
    with tempfile.TemporaryDirectory(prefix='packed_step_') as tmp:
      print(json.dumps(step_vs_synthetic(args.step_archive, tmp, args.step_config,
                                         args.step_steps, args.step_log_every, extra)))
    return
  parser.error('--step_archive is required (row (c) of the host table: bench_stream.py host)')


if __name__ == '__main__':
  main()
