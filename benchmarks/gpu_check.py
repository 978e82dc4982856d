"""Every GPU figure of issue 23 in one command, each stage on its own time budget.

Run through `benchmarks/gpu_check.sh` (which installs the carried wheels first):

  bash benchmarks/gpu_check.sh                 # on the GPU machine: <= 9 minutes
  bash benchmarks/gpu_check.sh --rehearse      # the same on a CPU, tiny sizes, minutes
  python benchmarks/gpu_check.py --list        # the plan, nothing runs
  python benchmarks/gpu_check.py --size_check  # what would travel to the GPU machine
  python benchmarks/gpu_check.py --render=FILES_AT/summary.json   # tables for the docs

Why one driver: the GPU lease is 15 minutes in all, a start costs minutes, and
$OUT comes back even when the command is killed. So every stage runs in its
own process (fresh peak memory, no compile cache shared, a crash stays in its
stage) under its own timeout, stages are ordered by value, one that would not
fit in what is left of the deadline is skipped, and `summary.json` is rewritten
(atomically) after every stage: a timeout still returns every figure so far.

This process imports no JAX and no torch: it must never hold the GPU itself.

Files under --out (at most 8; the device tool brings back 8 files of < 16 MiB):
  summary.json        every stage: status, seconds, command, result; derived ratios
  log.txt             this driver's progress (written by gpu_check.sh's tee)
  env.txt             nvidia-smi, versions, devices
  stages.log          every stage's own output, in order (capped)
  tta_metrics.jsonl   the time-to-accuracy run's metrics, each row with its wall time
"""

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHIVE = os.path.join('.data', 'imagenette2-128sq.tgz')  # Relative to the repo root.
IMAGENETTE_TRAIN = 9_469
CARRY = ('.whl', '.peer', ARCHIVE)  # The run tool's `carry` list.
CARRY_LIMIT = 64 * 2**20  # What may travel with one command (working tree + carried).
OUT_FILE_LIMIT = 15 * 2**20  # Each file back from $OUT must stay < 16 MiB.
GRACE_S = 25  # SIGTERM -> SIGKILL.

# XLA GPU settings worth trying on Hopper, each a variant of the bf16 R50 step. Our
# convolutions are NHWC and bf16 by construction (flax), the layout cuDNN's tensor-core
# kernels want, so the open questions are scheduling, autotuning and fusion.
XLA_VARIANTS = (
    ('latency_hiding', '--xla_gpu_enable_latency_hiding_scheduler=true'),
    ('no_command_buffer', '--xla_gpu_enable_command_buffer='),  # No CUDA graphs.
    ('cudnn_gemm_fusion', '--xla_gpu_cudnn_gemm_fusion_level=2'),
    ('no_triton_gemm', '--xla_gpu_enable_triton_gemm=false'),
    ('autotune_off', '--xla_gpu_autotune_level=0'),  # What autotuning buys.
)


@dataclasses.dataclass
class Stage:
  """One measured thing: a command, its time budget, how to read its result."""
  name: str
  cmd: list
  budget_s: float
  min_s: float = 45.0  # Not started with less time left than this.
  env: dict = dataclasses.field(default_factory=dict)
  kind: str = 'json_file'  # json_file (--json_out) | json_line (last stdout line) | env | tta
  json_path: str = ''
  soft_stop_s: float = 0.0  # tta: SIGTERM at this many seconds is the normal end.
  needs: tuple = ()  # Prerequisites: names of `PREREQUISITES`.


PEER_BUILDER = os.path.join('.peer', 'moco', 'moco', 'builder.py')


def _module_missing(name: str) -> bool:
  import importlib.util  # pylint: disable=g-import-not-at-top
  return importlib.util.find_spec(name) is None


# name -> (is it missing?, what to do). Checked before a stage starts, so a stage without its
# inputs is skipped with the fix instead of ending in its child's traceback.
PREREQUISITES = {
    'archive': (lambda: not os.path.exists(os.path.join(_ROOT, ARCHIVE)),
                f'no {ARCHIVE}: run `bash benchmarks/gpu_check.sh --prepare` here and carry '
                f'{ARCHIVE}'),
    'peer': (lambda: not os.path.exists(os.path.join(_ROOT, PEER_BUILDER)),
             f'no {PEER_BUILDER} (the official code): run `GPUCHECK_PEER_GITDIR=DIR bash '
             'benchmarks/gpu_check.sh --prepare` with DIR the git directory of a fetched '
             'facebookresearch/moco, and carry .peer'),
    'torch': (lambda: _module_missing('torch') or _module_missing('torchvision'),
              'torch and torchvision are not installed: `pip install torch torchvision` (the '
              'GPU image has them; the official stages need them)'),
}


def missing_prerequisites(stage: Stage) -> list:
  """The fixes of `stage`'s missing prerequisites ([] when it can run)."""
  return [PREREQUISITES[n][1] for n in stage.needs if PREREQUISITES[n][0]()]


def backend_refusal(rehearse: bool, backend: Optional[str] = None) -> Optional[str]:
  """The one-line reason a GPU-sized check must not run here, or None.

  A GPU run on a CPU would spend its whole deadline compiling ResNet-50 steps
  at batch 256; the JAX backend is asked in a child process, so that this
  driver never holds the GPU the stages need.
  """
  if rehearse:
    return None
  if backend is None:
    proc = subprocess.run([sys.executable, '-c', 'import jax; print(jax.default_backend())'],
                          capture_output=True, text=True, timeout=300)
    backend = (proc.stdout.strip().splitlines() or ['unknown'])[-1]
  if backend == 'cpu':
    return ('Error (device): JAX runs on the CPU here: the GPU check needs a GPU. Rehearse it '
            'with tiny sizes instead: bash benchmarks/gpu_check.sh --rehearse')
  return None


def sizes(rehearse: bool) -> dict:
  """The sizes of the real check, or of its CPU rehearsal (same stages, tiny)."""
  if rehearse:
    return dict(preset='tiny', arch='resnet18', px=32, batch=64, mem_batch=32, queue=256,
                big_queue=4096, steps=3, warmup=1, peer_steps=2, peer_warmup=1,
                # 16 px: a 2-core CPU runs an epoch of Imagenette in ~10 s, so the budget
                # holds a few kNN points after the ~70 s of decoding and compiling.
                tta_model=['--config.model.name=resnet_tiny', '--config.model.width=8',
                           '--config.model.stem=cifar', '--config.data.image_size=16',
                           '--config.moco.queue_size=1024', '--config.eval.batch_size=1024'],
                # 720 s before the packed_stream stage (issue 29), which adds <= 200 s.
                tta_budget_s=130, deadline_s=920, variants=XLA_VARIANTS[:1],
                stream=['--step_config=' + os.path.join(_ROOT, 'configs', 'tiny.py'),
                        '--step_steps=6', '--step_log_every=2', '--config.batch_size=32',
                        '--config.data.image_size=16', '--config.moco.queue_size=256'],
                stream_budget_s=240)
  return dict(preset='r50_224', arch='resnet50', px=224, batch=256, mem_batch=32, queue=65536,
              big_queue=1_048_576, steps=20, warmup=3, peer_steps=10, peer_warmup=3,
              # 16 decoding threads (the machine's cores): the archive's decode counts in the budget.
              tta_model=['--config.data.num_workers=16'], tta_budget_s=120, deadline_s=540,
              variants=XLA_VARIANTS,
              # R50 at 224 px, batch 256, bf16: the step the host must keep fed.
              stream=['--step_config=' + os.path.join(_ROOT, 'configs', 'imagenet.py'),
                      '--step_steps=40', '--step_log_every=10', '--config.data.num_workers=16',
                      '--config.model.dtype=bfloat16'],
              stream_budget_s=240)


def plan(args, tmp: str) -> list:
  """The stages in the order they run (most wanted first)."""
  s = sizes(args.rehearse)
  if args.tta_budget_s:
    s['tta_budget_s'] = args.tta_budget_s
  py = sys.executable
  bench = os.path.join(_ROOT, 'benchmarks', 'bench_train.py')
  peer = os.path.join(_ROOT, 'benchmarks', 'peer', 'bench_peer.py')
  device = 'cpu' if args.rehearse else 'cuda'

  def ours(name, dtype, batch=s['batch'], queue=s['queue'], steps=s['steps'],
           warmup=s['warmup'], budget=150, flags=''):
    out = os.path.join(tmp, name + '.json')
    cmd = [py, bench, f"--preset={s['preset']}", f'--dtype={dtype}', f'--batch={batch}',
           f'--queue={queue}', f'--steps={steps}', f'--warmup={warmup}', f'--json_out={out}']
    env = {'XLA_FLAGS': flags} if flags else {}
    return Stage(name, cmd, budget, env=env, json_path=out)

  def official(name, amp):
    cmd = [py, peer, '_peer_step', f'--device={device}', f'--amp={amp}', f"--arch={s['arch']}",
           f"--image_size={s['px']}", f"--batch={s['batch']}", f"--queue={s['queue']}",
           f"--steps={s['peer_steps']}", f"--warmup={s['peer_warmup']}"]
    return Stage(name, cmd, 90, min_s=30, kind='json_line', needs=('peer', 'torch'))

  workdir = os.path.join(tmp, 'tta')
  tta = [py, os.path.join(_ROOT, 'main.py'), '--config=' + os.path.join(_ROOT, 'configs',
                                                                        'imagenette.py'),
         f'--workdir={workdir}', '--config.data.path=' + os.path.join(_ROOT, ARCHIVE),
         '--config.data.on_device=True', '--config.eval.knn_every_epochs=1',
         '--config.tensorboard=False', '--config.data.cache_dir=' + os.path.join(tmp, 'cache'),
         '--config.checkpoint_every_steps=1000000', '--config.log_every_steps=12',
         '--config.model.dtype=' + ('float32' if args.rehearse else 'bfloat16'),
         *s['tta_model']]
  stages = [
      Stage('env', [py, __file__, '--_env'], 60, min_s=5, kind='env'),
      ours('ours_bf16', 'bfloat16'),
      official('official_fp32', 'none'),
      official('official_bf16', 'bf16'),
      ours('ours_fp32', 'float32'),
      Stage('time_to_accuracy', tta, s['tta_budget_s'] + 45, min_s=60, kind='tta',
            json_path=workdir, soft_stop_s=s['tta_budget_s'], needs=('archive',)),
      # Issue 29: pack the archive, then the streamed step (input included) vs synthetic data.
      Stage('packed_stream', [py, os.path.join(_ROOT, 'benchmarks', 'bench_packed.py'),
                              '--step_archive=' + os.path.join(_ROOT, ARCHIVE), *s['stream']],
            s['stream_budget_s'], min_s=150, kind='json_line', needs=('archive',)),
      ours('mem32_bf16', 'bfloat16', batch=s['mem_batch'], steps=2, warmup=1, budget=100),
      ours('mem32_fp32', 'float32', batch=s['mem_batch'], steps=2, warmup=1, budget=100),
      ours('queue_big_bf16', 'bfloat16', queue=s['big_queue'], steps=max(s['steps'] // 2, 2),
           budget=120),
  ]
  for name, flags in s['variants']:
    stages.append(ours('xla_' + name, 'bfloat16', steps=max(s['steps'] // 2, 2), budget=120,
                       flags=flags))
  if args.only:
    wanted = set(args.only.split(','))
    unknown = wanted - {st.name for st in stages}
    if unknown:
      raise SystemExit(f'Error (flag): --only names unknown stages {sorted(unknown)}; '
                       f'known: {[st.name for st in stages]}.')
    stages = [st for st in stages if st.name in wanted]
  return stages


# ---------------------------------------------------------------------------
# Running a stage.


def write_json_atomic(path: str, value) -> None:
  """Write-then-rename: a kill mid-write leaves the previous summary, never half of one."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=1)  # Insertion order: stages in the order they ran.
  os.replace(tmp, path)


def _append_capped(path: str, text: str, limit: int = OUT_FILE_LIMIT) -> None:
  """Appends `text`, keeping the file under `limit` bytes (the device tool's cap)."""
  used = os.path.getsize(path) if os.path.exists(path) else 0
  room = limit - used
  if room <= 0:
    return
  data = text.encode(errors='replace')
  if len(data) > room:
    data = data[:room - 200] + b'\n[... cut: stages.log reached its size cap]\n'
  with open(path, 'ab') as f:
    f.write(data)


def run_process(cmd, env: dict, timeout_s: float, log_path: str, soft_stop_s: float = 0.0,
                on_poll: Optional[Callable] = None) -> dict:
  """Runs `cmd` in its own process group; SIGTERM at soft_stop_s or timeout, then SIGKILL.

  Returns {'returncode', 'seconds', 'timed_out', 'stopped', 'maxrss_bytes', 'stdout'}.
  The child's peak RSS (os.wait4) is the memory figure on a CPU, where no
  device allocator reports one.
  """
  with tempfile.TemporaryFile(mode='w+') as out:
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=_ROOT,
                            env={**os.environ, **env}, start_new_session=True)
    timed_out = stopped = False
    term_at = None
    while True:
      pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
      if pid:
        break
      elapsed = time.monotonic() - start
      if on_poll:
        on_poll(elapsed)
      if term_at is None and (elapsed > timeout_s or (soft_stop_s and elapsed > soft_stop_s)):
        timed_out = elapsed > timeout_s
        stopped = not timed_out
        term_at = elapsed
        _signal_group(proc.pid, signal.SIGTERM)
      elif term_at is not None and elapsed > max(term_at + GRACE_S, timeout_s):
        timed_out = True
        _signal_group(proc.pid, signal.SIGKILL)
      time.sleep(0.5)
    proc.returncode = os.waitstatus_to_exitcode(status)
    _signal_group(proc.pid, signal.SIGKILL)  # Whatever it left behind.
    if on_poll:
      on_poll(time.monotonic() - start)
    out.seek(0)
    text = out.read()
  _append_capped(log_path, f"\n===== {' '.join(cmd)}\n{text}")
  return dict(returncode=proc.returncode, seconds=time.monotonic() - start, timed_out=timed_out,
              stopped=stopped, maxrss_bytes=usage.ru_maxrss * 1024, stdout=text)


def _signal_group(pid: int, signum) -> None:
  try:
    os.killpg(pid, signum)
  except (ProcessLookupError, PermissionError):
    pass


class TtaWatcher:
  """Stamps each new row of the run's metrics.jsonl with the wall time since launch."""

  def __init__(self, workdir: str, out_path: str):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.out_path = out_path
    self.rows = []
    self._offset = 0

  def __call__(self, elapsed: float):
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      f.seek(self._offset)
      chunk = f.read()
    complete = chunk[:chunk.rfind('\n') + 1]
    self._offset += len(complete)
    for line in complete.splitlines():
      if line.strip():
        row = {**json.loads(line), 'wall_s': round(elapsed, 2)}
        self.rows.append(row)
        with open(self.out_path, 'a') as f:
          f.write(json.dumps(row) + '\n')


def tta_summary(rows: list, train_images: int = IMAGENETTE_TRAIN, epochs: int = 200) -> dict:
  """The kNN curve and the projected time of `epochs` epochs from the stamped metrics rows.

  Two projections: train steps only (200 x the split / the median img/s of the
  logged intervals, which leave the kNN monitor out), and wall time as run
  (the first kNN's wall time, the launch, data decoding and compilation
  included, plus the median wall time per later epoch, kNN included).
  """
  curve = [dict(epoch=round(r['epoch'], 3), knn_top1=r['knn_top1'], wall_s=r['wall_s'])
           for r in rows if 'knn_top1' in r]
  rates = [r['images_per_sec'] for r in rows if 'images_per_sec' in r]
  result = dict(knn_curve=curve, epochs_done=curve[-1]['epoch'] if curve else 0.0)
  if rates:
    median = statistics.median(rates)
    result.update(train_images_per_second=median,
                  projected_train_seconds=epochs * train_images / median)
  if len(curve) >= 2:
    per_epoch = statistics.median(
        (b['wall_s'] - a['wall_s']) / max(b['epoch'] - a['epoch'], 1e-9)
        for a, b in zip(curve, curve[1:]))
    result.update(wall_seconds_per_epoch=per_epoch,
                  projected_wall_seconds=curve[0]['wall_s'] + (epochs - curve[0]['epoch'])
                  * per_epoch)
  return result


def read_result(stage: Stage, proc: dict, out_dir: str, watcher=None) -> dict:
  """The stage's figures (raises if it produced none)."""
  if stage.kind == 'json_file':
    with open(stage.json_path) as f:
      result = json.load(f)
  elif stage.kind in ('json_line', 'env'):
    lines = [l for l in proc['stdout'].splitlines() if l.startswith('{')]
    if not lines:
      raise ValueError('no JSON line in its output')
    result = json.loads(lines[-1])
  elif stage.kind == 'tta':
    result = tta_summary(watcher.rows if watcher else [])
    if not result['knn_curve']:
      raise ValueError('no kNN row in metrics.jsonl (no epoch finished within the budget?)')
  else:
    raise ValueError(f'unknown stage kind {stage.kind}')
  if stage.kind != 'env':
    result['host_peak_rss_bytes'] = proc['maxrss_bytes']
  return result


def derive(results: dict) -> dict:
  """Ratios across stages, from whatever is there so far."""
  def ips(name):
    return (results.get(name) or {}).get('images_per_second')

  def step_ms(name):
    r = results.get(name) or {}
    return 1000 * r['step_seconds'] if 'step_seconds' in r else None

  derived = {}
  for ours, theirs in (('ours_bf16', 'official_bf16'), ('ours_fp32', 'official_fp32'),
                       ('ours_bf16', 'official_fp32')):
    if ips(ours) and ips(theirs):
      derived[f'{ours}_over_{theirs}'] = ips(ours) / ips(theirs)
  if step_ms('ours_bf16') and step_ms('queue_big_bf16'):
    derived['queue_step_ms'] = {str(results['ours_bf16']['queue']): step_ms('ours_bf16'),
                                str(results['queue_big_bf16']['queue']): step_ms('queue_big_bf16')}
  if (results.get('packed_stream') or {}).get('packed_over_synthetic'):
    derived['packed_stream_over_synthetic'] = results['packed_stream']['packed_over_synthetic']
  variants = {n: ips(n) / ips('ours_bf16') for n in results
              if n.startswith('xla_') and ips(n) and ips('ours_bf16')}
  if variants:
    derived['xla_variant_speedup_vs_default'] = variants
  return derived


def _env_worker() -> dict:
  """Versions and devices (run as a stage: it imports JAX, which takes the GPU)."""
  import platform  # pylint: disable=g-import-not-at-top
  info = {'python': platform.python_version(), 'machine': platform.machine()}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax.checkpoint', 'numpy', 'torch',
               'torchvision', 'ml_collections'):
    try:
      module = __import__(name, fromlist=['__version__'])
      info[name] = getattr(module, '__version__', '?')
    except ImportError as e:
      info[name] = f'missing ({e})'
  import jax  # pylint: disable=g-import-not-at-top
  info['devices'] = [f'{d.platform}:{d.device_kind}' for d in jax.devices()]
  try:
    import torch  # pylint: disable=g-import-not-at-top
    info['torch_cuda'] = torch.cuda.is_available()
  except ImportError:
    pass
  return info


def run_all(args) -> dict:
  """Runs the plan under the deadline, rewriting summary.json after every stage."""
  started = args.started_at or time.time()
  deadline = started + (args.deadline_s or sizes(args.rehearse)['deadline_s'])
  os.makedirs(args.out, exist_ok=True)
  summary_path = os.path.join(args.out, 'summary.json')
  log_path = os.path.join(args.out, 'stages.log')
  summary = dict(schema=1, mode='rehearse' if args.rehearse else 'gpu', command=sys.argv,
                 started_utc=time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(started)),
                 deadline_s=deadline - started, stages={}, results={}, derived={})
  with tempfile.TemporaryDirectory(prefix='gpucheck_') as tmp:
    stages = plan(args, tmp)
    # One persistent JAX cache for every stage: with it JAX also keeps XLA's per-fusion
    # autotuning results, so the later R50 stages (queue, XLA variants) skip re-autotuning
    # the convolutions of ours_bf16. Programs differ between stages, so no step is reused.
    os.environ['JAX_COMPILATION_CACHE_DIR'] = os.path.join(tmp, 'jax_cache')
    summary['plan'] = [st.name for st in stages]
    write_json_atomic(summary_path, summary)
    for stage in stages:
      left = deadline - time.time()
      record = dict(budget_s=stage.budget_s, command=stage.cmd, env=stage.env)
      if left < stage.min_s:
        record.update(status='skipped', reason=f'{left:.0f} s left of the deadline, needs '
                      f'{stage.min_s:.0f} s')
        _say(started, f'{stage.name}: skipped ({record["reason"]})')
        summary['stages'][stage.name] = record
        write_json_atomic(summary_path, summary)
        continue
      missing = missing_prerequisites(stage)
      if missing:
        record.update(status='skipped', reason='; '.join(missing))
        _say(started, f'{stage.name}: skipped ({record["reason"]})')
        summary['stages'][stage.name] = record
        write_json_atomic(summary_path, summary)
        continue
      timeout = min(stage.budget_s, left)
      _say(started, f'{stage.name}: started (timeout {timeout:.0f} s)')
      watcher = (TtaWatcher(stage.json_path, os.path.join(args.out, 'tta_metrics.jsonl'))
                 if stage.kind == 'tta' else None)
      soft = min(stage.soft_stop_s, max(timeout - GRACE_S - 10, 1)) if stage.soft_stop_s else 0
      proc = run_process(stage.cmd, stage.env, timeout, log_path, soft_stop_s=soft,
                         on_poll=watcher)
      record.update(seconds=round(proc['seconds'], 1), returncode=proc['returncode'])
      ok_codes = (0, 75) if stage.kind == 'tta' else (0,)  # 75: stopped by SIGTERM, saved.
      try:
        if proc['returncode'] not in ok_codes:
          raise RuntimeError(f"exit {proc['returncode']}"
                             + (' (timed out)' if proc['timed_out'] else ''))
        result = read_result(stage, proc, args.out, watcher)
        record['status'] = 'ok'
        summary['results'][stage.name] = result
        if stage.kind == 'env':
          with open(os.path.join(args.out, 'env.txt'), 'w') as f:
            f.write(json.dumps(result, indent=1) + '\n' + _nvidia_smi())
      except (RuntimeError, ValueError, OSError, KeyError) as e:
        record.update(status='timeout' if proc['timed_out'] else 'failed', error=str(e),
                      tail=proc['stdout'][-3000:])
        if watcher and watcher.rows:  # A partial curve is still a figure.
          summary['results'][stage.name] = tta_summary(watcher.rows)
      summary['stages'][stage.name] = record
      summary['derived'] = derive(summary['results'])
      write_json_atomic(summary_path, summary)
      _say(started, f'{stage.name}: {record["status"]} in {record["seconds"]} s'
           + (f' - {_brief(summary["results"].get(stage.name))}' if record['status'] == 'ok'
              else f' - {record.get("error")}: {_last_lines(proc["stdout"])}'))
  summary['finished_s'] = round(time.time() - started, 1)
  write_json_atomic(summary_path, summary)
  _say(started, 'done: ' + json.dumps(summary['derived']))
  return summary


def _nvidia_smi() -> str:
  try:
    return subprocess.run(['nvidia-smi'], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=30).stdout
  except (OSError, subprocess.TimeoutExpired) as e:
    return f'nvidia-smi: {e}\n'


def _brief(result: Optional[dict]) -> str:
  if not result:
    return ''
  keys = ('images_per_second', 'peak_memory_bytes', 'mfu', 'epochs_done', 'knn_curve',
          'projected_train_seconds', 'devices')
  parts = []
  for key in keys:
    value = result.get(key)
    if key == 'knn_curve' and value:
      value = [(c['epoch'], round(c['knn_top1'], 1)) for c in value]
    if value is not None:
      parts.append(f'{key}={value:.4g}' if isinstance(value, float) else f'{key}={value}')
  return ', '.join(parts)


def _last_lines(text: str, n: int = 3) -> str:
  return ' | '.join(l.strip() for l in text.strip().splitlines()[-n:])


def _say(started: float, message: str) -> None:
  print(f'[gpu_check {time.time() - started:5.0f} s] {message}', flush=True)


# ---------------------------------------------------------------------------
# Dry parts: the plan, what travels, the tables for the docs.


def carried_bytes(root: str = _ROOT, carry=CARRY) -> dict:
  """Bytes that travel with a `run` call: git's tracked + untracked-not-ignored files + carry."""
  listed = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
                          cwd=root, check=True, stdout=subprocess.PIPE).stdout
  tree = sum(os.path.getsize(os.path.join(root, p)) for p in listed.decode().split('\0')
             if p and os.path.isfile(os.path.join(root, p)))
  sizes_ = {'working_tree': tree}
  for path in carry:
    full = os.path.join(root, path)
    if os.path.isfile(full):
      sizes_[path] = os.path.getsize(full)
    elif os.path.isdir(full):
      sizes_[path] = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(full)
                         for f in files)
    else:
      sizes_[path] = None  # Missing: the check fails.
  return sizes_


def size_check(root: str = _ROOT, carry=CARRY) -> int:
  """Prints what travels; returns 0 if it is all there and under the limit, else 1."""
  found = carried_bytes(root, carry)
  missing = [p for p, b in found.items() if b is None]
  total = sum(b for b in found.values() if b)
  for path, size in found.items():
    print(f'{path:32s} {"MISSING" if size is None else f"{size / 2**20:8.2f} MiB"}')
  print(f'{"total":32s} {total / 2**20:8.2f} MiB (limit {CARRY_LIMIT / 2**20:.0f} MiB)')
  if missing:
    print(f'Error (carry): {", ".join(missing)} missing; prepare them as docs/benchmarks.md '
          '"GPU check" says.')
    return 1
  if total > CARRY_LIMIT:
    print(f'Error (carry): {total / 2**20:.1f} MiB would travel, over the '
          f'{CARRY_LIMIT / 2**20:.0f} MiB limit; carry less.')
    return 1
  return 0


def render(summary_path: str) -> str:
  """Markdown tables of a summary.json (for docs/benchmarks.md)."""
  sys.path.insert(0, os.path.join(_ROOT, 'benchmarks'))
  import bench_train  # pylint: disable=g-import-not-at-top
  with open(summary_path) as f:
    summary = json.load(f)
  results = summary['results']
  lines = [f"GPU check ({summary['mode']}), started {summary['started_utc']} UTC, "
           f"{summary.get('finished_s', '?')} s in all.", '']
  env = results.get('env')
  if env:
    lines += ['Environment: ' + ', '.join(f'{k} {v}' for k, v in env.items()), '']
  lines += ['| stage | status | seconds |', '| --- | --- | --- |']
  lines += [f"| {n} | {s['status']} | {s.get('seconds', '')} |"
            for n, s in summary['stages'].items()]
  ours = [(n, bench_train.Result(**{k: v for k, v in r.items() if k != 'host_peak_rss_bytes'}))
          for n, r in results.items() if 'preset' in r]
  if ours:
    lines += ['', '| stage | ' + bench_train.TABLE_HEADER.split('\n')[0][2:] + ' host peak RSS |',
              '| --- ' + bench_train.TABLE_HEADER.split('\n')[1] + ' --- |']
    lines += [f'| {n} ' + r.as_row() + f" {results[n]['host_peak_rss_bytes'] / 2**30:.2f} GiB |"
              for n, r in ours]
  peers = [(n, r) for n, r in results.items() if r.get('system') == 'official']
  if peers:
    lines += ['', '| stage | arch | px | batch | K | amp | device | step ms | img/s | peak mem '
              '| host peak RSS |', '| --- ' * 11 + '|']
    for n, r in peers:
      mem = (f"{r['peak_memory_bytes'] / 2**30:.2f} GiB" if r['peak_memory_bytes'] is not None
             else 'n/a')
      lines.append(f"| {n} | {r['arch']} | {r['image_size']} | {r['batch']} | {r['queue']} "
                   f"| {r['amp']} | {r['device']} | {1000 * r['step_seconds']:.1f} "
                   f"| {r['images_per_second']:.1f} | {mem} "
                   f"| {r['host_peak_rss_bytes'] / 2**30:.2f} GiB |")
  tta = results.get('time_to_accuracy')
  if tta:
    curve = ', '.join(f"ep {c['epoch']:g}: {c['knn_top1']:.1f}% at {c['wall_s']:.0f} s"
                      for c in tta['knn_curve'])
    lines += ['', f'Time to accuracy: kNN top-1 {curve}.']
    if 'projected_train_seconds' in tta:
      lines.append(f"Projected 200 epochs: {tta['projected_train_seconds'] / 60:.1f} min of train "
                   f"steps ({tta['train_images_per_second']:.0f} img/s)"
                   + (f", {tta['projected_wall_seconds'] / 60:.1f} min wall with a kNN every "
                      'epoch' if 'projected_wall_seconds' in tta else '') + '.')
  if summary.get('derived'):
    lines += ['', 'Derived: `' + json.dumps(summary['derived']) + '`']
  return '\n'.join(lines) + '\n'


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--rehearse', action='store_true',
                      help='the same stages on a CPU with tiny sizes (minutes).')
  parser.add_argument('--out', default=os.environ.get('OUT') or os.path.join(_ROOT, '.gpucheck'),
                      help='where summary.json and the other files go (default: $OUT).')
  parser.add_argument('--deadline_s', type=float, default=0,
                      help='seconds from --started_at by which everything ends (default: 540 '
                      'on a GPU, 720 rehearsing).')
  parser.add_argument('--started_at', type=float, default=0,
                      help='epoch seconds the whole command started (gpu_check.sh passes it).')
  parser.add_argument('--tta_budget_s', type=float, default=0,
                      help='wall-clock seconds of the time-to-accuracy run (default: 120 on a '
                      'GPU, 130 rehearsing).')
  parser.add_argument('--only', default='', help='comma-separated stage names to run.')
  parser.add_argument('--list', action='store_true', help='print the plan and exit.')
  parser.add_argument('--size_check', action='store_true',
                      help='print what would travel to the GPU machine and check the limit.')
  parser.add_argument('--render', default='', help='print the docs tables of a summary.json.')
  parser.add_argument('--_env', action='store_true', help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args._env:  # pylint: disable=protected-access
    print(json.dumps(_env_worker()), flush=True)
    return 0
  if args.size_check:
    return size_check()
  if args.render:
    print(render(args.render), end='')
    return 0
  if args.list:
    with tempfile.TemporaryDirectory() as tmp:
      for stage in plan(args, tmp):
        env = ' '.join(f'{k}={v}' for k, v in stage.env.items())
        print(f'{stage.name:20s} {stage.budget_s:5.0f} s  {env} {" ".join(stage.cmd[1:])}')
    return 0
  refusal = backend_refusal(args.rehearse)
  if refusal:
    print(refusal, file=sys.stderr, flush=True)
    return 2
  summary = run_all(args)
  return 0 if any(s['status'] == 'ok' for s in summary['stages'].values()) else 1


if __name__ == '__main__':
  sys.exit(main())
