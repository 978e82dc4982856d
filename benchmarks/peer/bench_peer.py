"""Times the official PyTorch MoCo (facebookresearch/moco) next to ours.

The peer's code is never committed and never edited: it is exported into
`.peer/moco` (git-ignored) from a snapshot of the public repository, and every
change needed to run it is a monkeypatch made here and listed below.

  # CPU, now: the peer's builder + SGD step vs our step at the same size.
  python benchmarks/peer/bench_peer.py cpu --torch_python=/tmp/peervenv/bin/python

  # GPU: the peer's own main_moco.py on Imagenette (128 px JPEGs), one GPU, DDP.
  python benchmarks/peer/bench_peer.py gpu --torch_python=PY --arch=resnet50 --crop=224
  python benchmarks/peer/bench_peer.py gpu --torch_python=PY --arch=resnet50 --crop=224 --amp=bf16
  python benchmarks/peer/bench_peer.py gpu --torch_python=PY --arch=resnet18 --crop=128

  # Images/s of an existing main_moco.py log.
  python benchmarks/peer/bench_peer.py parse LOG --batch=256

Peer setup (torch in its own venv, never in requirements.txt):
  python3 -m venv /tmp/peervenv
  /tmp/peervenv/bin/pip install torch==2.14.1 torchvision==0.29.1
  (the GPU machine's image has torch and torchvision: --torch_python=python3)

`cpu` starts two worker processes, the peer (torch venv) and our whole train
step (`bench_train.StepBench`, our venv), warms both up, then times them in
alternating windows (only one computes at a time), so that the drifting load
of a shared machine hits both alike; the ratio is the median over windows.
Then a third process times our on-device augmentation alone. The peer's step
takes images already augmented (in main_moco.py its DataLoader workers do
that on the CPU, outside the model step), while ours augments inside the
step; so two ratios are given: whole step vs their model step, and ours less
our augmentation vs theirs.

What is changed in the peer, and why (nothing else):
  cpu and gpu: main_moco.py's `accuracy` is replaced by the same computation
    with `.reshape(-1)` for `.view(-1)`: with current PyTorch, `correct[:k]`
    is not contiguous and their `.view(-1)` raises on the first step for k=5.
  cpu: `torch.Tensor.cuda` is replaced by the identity in the peer's process:
    `MoCo._batch_shuffle_ddp` and `MoCo.forward` call `.cuda()` on the
    shuffle permutation and the labels. The process group is gloo, world size 1,
    so `concat_all_gather` and the broadcast work unchanged.
  gpu --crop=N (N != 224): `torchvision.transforms.RandomResizedCrop(224, ...)`
    in main_moco.py is made to crop N px, so R18 runs at the recipe's 128 px.
  gpu --amp=bf16: `MoCo.forward` runs under `torch.autocast('cuda', bfloat16)`
    and returns float32 logits (the loss is taken in float32). main_moco.py has
    no mixed precision; bf16 needs no loss scaler, so the loop is unchanged.
"""

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PEER_DIR = os.path.join(_ROOT, '.peer', 'moco')
PEER_REPO = 'github:facebookresearch/moco'
# The last upstream commit (the MIT relicensing, 2023-01-18). The six after it up to 3b42c2a
# only reformat (Black/Ruff, `class X:`), later ones import
# `deeplearning.cross_image_ssl.moco.builder`, and the branch head (8976944) deletes every file.
PEER_COMMIT = '7397dfe'
DATA_ARCHIVE = os.path.join(os.path.dirname(_ROOT), 'shared', 'data', 'imagenette2-128sq.tgz')
DATA_DIR = os.path.join(_ROOT, '.data')
DOCS_SECTION = '## Versus the official PyTorch MoCo'
PEER_HEADER = ('| system | arch | px | batch | K | dtype | device | step ms | img/s | note |\n'
               '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |')

# In main_moco.py's children (torch.multiprocessing spawn re-runs this file as
# `__mp_main__`), the patches must be in place before `main_worker` runs, so
# they are applied at import time when the parent asked for them.
_PATCH_ENV = 'MOCO_PEER_PATCH'


def _check_peer():
  if not os.path.exists(os.path.join(PEER_DIR, 'moco', 'builder.py')):
    raise SystemExit(
        f'No peer code in {PEER_DIR}. Export it (never commit it):\n'
        f'  fetch {PEER_REPO}   # the search tool; gives GITDIR\n'
        f'  mkdir -p {PEER_DIR} && git --git-dir=GITDIR archive {PEER_COMMIT} | '
        f'tar -x -C {PEER_DIR}')


def fixed_accuracy(output, target, topk=(1,)):
  """main_moco.accuracy with `.reshape(-1)` for `.view(-1)` (fails on current torch)."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    maxk = max(topk)
    batch_size = target.size(0)
    _, pred = output.topk(maxk, 1, True, True)
    pred = pred.t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    res = []
    for k in topk:
      correct_k = correct[:k].reshape(-1).float().sum(0, keepdim=True)
      res.append(correct_k.mul_(100.0 / batch_size))
    return res


def apply_gpu_patches(crop: int, amp: str):
  """The monkeypatches of `gpu` mode (see the module docstring)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision.transforms as transforms  # pylint: disable=g-import-not-at-top
  if PEER_DIR not in sys.path:
    sys.path.insert(0, PEER_DIR)
  import main_moco  # pylint: disable=g-import-not-at-top
  import moco.builder  # pylint: disable=g-import-not-at-top

  main_moco.accuracy = fixed_accuracy

  if crop and crop != 224:
    base = transforms.RandomResizedCrop
    if not getattr(base, '_moco_bench_patched', False):

      class RandomResizedCrop(base):
        _moco_bench_patched = True

        def __init__(self, size, *args, **kwargs):
          del size  # main_moco.py hard-codes 224.
          super().__init__(crop, *args, **kwargs)

      transforms.RandomResizedCrop = RandomResizedCrop
  if amp == 'bf16':
    forward = moco.builder.MoCo.forward
    if not getattr(forward, '_moco_bench_patched', False):

      def autocast_forward(self, im_q, im_k):
        with torch.autocast('cuda', dtype=torch.bfloat16):
          logits, labels = forward(self, im_q, im_k)
        return logits.float(), labels

      autocast_forward._moco_bench_patched = True
      moco.builder.MoCo.forward = autocast_forward


if os.environ.get(_PATCH_ENV):
  _spec = json.loads(os.environ[_PATCH_ENV])
  apply_gpu_patches(_spec['crop'], _spec['amp'])


# ---------------------------------------------------------------------------
# Workers (each runs in its own interpreter).


def _serve(step, describe: dict):
  """Times `step` in windows on request: the driver alternates ours and theirs.

  Protocol (one JSON object a line): this prints {"ready": ..., **describe},
  then answers each stdin line "N" with {"seconds": time of N steps}; an
  empty line or end of input stops it. Everything else goes to stderr.
  """
  out = sys.stdout
  sys.stdout = sys.stderr  # Keep library chatter off the protocol.
  print(json.dumps({'ready': True, **describe}), file=out, flush=True)
  for line in sys.stdin:
    if not line.strip():
      break
    out.write(json.dumps({'seconds': step(int(line))}) + '\n')
    out.flush()


def _peer_step(args, device: str, amp: str):
  """(one_step, torch) for the peer's MoCo + main_moco.py's loop body on `device`.

  The caller must have a process group (their builder's Shuffle BN broadcasts
  and all-gathers). Inputs are pre-augmented random float tensors already on
  `device` (main_moco.py's DataLoader workers augment on the CPU, outside the step).
  """
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, PEER_DIR)
  import moco.builder  # pylint: disable=g-import-not-at-top

  if device == 'cpu':  # Their builder calls .cuda() on two index tensors: identity on CPU.
    torch.Tensor.cuda = lambda self, *a, **k: self
  else:
    torch.backends.cudnn.benchmark = True  # As main_moco.py's main_worker sets it.
  accuracy = fixed_accuracy  # main_moco.accuracy's .view(-1) fails on current torch.
  torch.manual_seed(0)
  model = moco.builder.MoCo(getattr(torchvision.models, args.arch), dim=128, K=args.queue,
                            m=0.999, T=0.2, mlp=True).to(device)
  model = torch.nn.parallel.DistributedDataParallel(
      model, device_ids=None if device == 'cpu' else [0])
  criterion = torch.nn.CrossEntropyLoss().to(device)
  optimizer = torch.optim.SGD(model.parameters(), 0.03 * args.batch / 256, momentum=0.9,
                              weight_decay=1e-4)
  shape = (args.batch, 3, args.image_size, args.image_size)
  im_q, im_k = torch.randn(shape, device=device), torch.randn(shape, device=device)
  model.train()

  def one_step():
    # main_moco.train's loop body, less the data loading; bf16: the autocast of `gpu --amp`.
    with torch.autocast(device, dtype=torch.bfloat16, enabled=amp == 'bf16'):
      output, target = model(im_q=im_q, im_k=im_k)
    output = output.float()
    loss = criterion(output, target)
    accuracy(output, target, topk=(1, 5))
    loss.item()  # main_moco.py's meters: one host sync per step, as theirs.
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

  return one_step, torch


def _process_group(device: str, tmp: str):
  import torch.distributed as dist  # pylint: disable=g-import-not-at-top
  dist.init_process_group('gloo' if device == 'cpu' else 'nccl', init_method=f'file://{tmp}/pg',
                          rank=0, world_size=1)
  return dist


def peer_cpu_server(args):
  """The peer's MoCo + main_moco.py's loop body (loss, accuracy, SGD) on CPU."""
  with tempfile.TemporaryDirectory() as tmp:
    dist = _process_group('cpu', tmp)
    one_step, torch = _peer_step(args, 'cpu', 'none')

    def steps(n):
      start = time.perf_counter()
      for _ in range(n):
        one_step()
      return time.perf_counter() - start

    _serve(steps, {'device': f'cpu, {torch.get_num_threads()} threads, torch {torch.__version__}'})
    dist.destroy_process_group()


def peer_step_worker(args) -> dict:
  """The peer's step timed once, on --device (cuda on the GPU machine), with its peak memory.

  For benchmarks/gpu_check.py: one JSON line. Peak memory is the CUDA caching
  allocator's `max_memory_allocated` over the whole process (parameters,
  optimiser state, queue and the step's activations), the counterpart of
  JAX's `peak_bytes_in_use`; on CPU it is None (gpu_check.py records the
  process's peak RSS instead).
  """
  device = 'cuda' if args.device == 'cuda' else 'cpu'
  with tempfile.TemporaryDirectory() as tmp:
    dist = _process_group(device, tmp)
    one_step, torch = _peer_step(args, device, args.amp)
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    start = time.perf_counter()
    one_step()
    sync()
    first = time.perf_counter() - start
    for _ in range(args.warmup):
      one_step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
      one_step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    name = torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu'
    result = dict(
        system='official', commit=PEER_COMMIT, arch=args.arch, image_size=args.image_size,
        batch=args.batch, queue=args.queue, amp=args.amp, device=name,
        torch=torch.__version__, steps=args.steps, first_step_seconds=first,
        step_seconds=seconds, images_per_second=args.batch / seconds,
        peak_memory_bytes=(int(torch.cuda.max_memory_allocated()) if device == 'cuda'
                           else None))
    dist.destroy_process_group()
  return result


def ours_cpu_server(args):
  """Our whole train step (bench_train.StepBench) at the same size, on CPU."""
  sys.path.insert(0, os.path.join(_ROOT, 'benchmarks'))
  import bench_train  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  preset = {'resnet18': 'r18_128', 'resnet50': 'r50_224'}[args.arch]
  config = bench_train.make_config(preset, batch=args.batch, image_size=args.image_size,
                                   queue=args.queue, dtype='float32')
  bench = bench_train.StepBench(config)
  bench.first_step()
  _serve(bench.run, {'device': f'cpu, XLA, jax {jax.__version__}',
                     'flops_per_image': bench.flops_per_image})
  bench.finish()


def ours_aug_worker(args) -> dict:
  """Our two-view augmentation alone, jitted, at the same size (our venv)."""
  sys.path.insert(0, _ROOT)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  from moco_jax.augmentation import augment  # pylint: disable=g-import-not-at-top

  aug = default.get_config().aug
  size = args.image_size
  views = jax.jit(lambda rng, images: augment.two_views(
      rng, images, jnp.arange(images.shape[0]), aug, size, jnp.float32))
  images = jnp.asarray(np.random.default_rng(0).integers(
      0, 256, (args.batch, size, size, 3), np.uint8))
  rng = jax.random.PRNGKey(0)
  for i in range(args.warmup + 1):
    jax.block_until_ready(views(jax.random.fold_in(rng, i), images))
  start = time.perf_counter()
  for i in range(args.steps):
    out = views(jax.random.fold_in(rng, 100 + i), images)
  jax.block_until_ready(out)
  return dict(step_seconds=(time.perf_counter() - start) / args.steps)


def _command() -> str:
  """This run's command line for the docs, less the flags that only say where to write."""
  kept = [a for a in sys.argv[1:]
          if a != '--append_docs' and not a.startswith(('--docs_path', '--torch_python'))]
  return 'python benchmarks/peer/bench_peer.py ' + ' '.join(kept)


def _run_json(cmd, env=None) -> dict:
  """Runs a worker command that prints one JSON line last; returns it."""
  print('+', ' '.join(cmd), flush=True)
  proc = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env)
  return json.loads(proc.stdout.strip().splitlines()[-1])


class _Server:
  """A worker process speaking `_serve`'s protocol."""

  def __init__(self, cmd, env=None):
    print('+', ' '.join(cmd), flush=True)
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=env)
    self.info = self._read()

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f'{self.proc.args[2]} exited ({self.proc.wait()}) before answering.')
    return json.loads(line)

  def time(self, steps: int) -> float:
    self.proc.stdin.write(f'{steps}\n')
    self.proc.stdin.flush()
    return self._read()['seconds']

  def close(self):
    self.proc.stdin.write('\n')
    self.proc.stdin.flush()
    if self.proc.wait(timeout=120):
      raise RuntimeError(f'{self.proc.args[2]} failed ({self.proc.returncode}).')


def run_cpu(args) -> dict:
  """Ours and theirs, both warm, timed in alternating windows; then our augmentation.

  The machine is shared, so its load drifts: timing the two one after the
  other compared different loads (the ratio moved between 0.5x and 1.0x from
  run to run). Here both processes are alive, only one computes at a time,
  and the ratio is the median of the ratios of adjacent windows.
  """
  _check_peer()
  size_flags = [f'--arch={args.arch}', f'--image_size={args.image_size}',
                f'--batch={args.batch}', f'--queue={args.queue}', f'--steps={args.steps}',
                f'--warmup={args.warmup}']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  peer = _Server([args.torch_python, os.path.abspath(__file__), '_peer_cpu', *size_flags])
  ours = _Server([sys.executable, os.path.abspath(__file__), '_ours_cpu', *size_flags], env=env)
  try:
    peer.time(args.warmup)
    ours.time(args.warmup)
    peer_times, ours_times = [], []
    for _ in range(args.rounds):
      peer_times.append(peer.time(args.steps) / args.steps)
      ours_times.append(ours.time(args.steps) / args.steps)
  finally:
    peer.close()
    ours.close()
  aug = _run_json([sys.executable, os.path.abspath(__file__), '_ours_aug', *size_flags],
                  env=env)
  ratios = [p / o for p, o in zip(peer_times, ours_times)]
  peer_seconds = statistics.median(peer_times)
  ours_seconds = statistics.median(ours_times)
  ours_model_seconds = ours_seconds - aug['step_seconds']
  result = dict(
      peer_step_seconds=peer_times, ours_step_seconds=ours_times,
      ours_aug_seconds=aug['step_seconds'], ratios=ratios,
      ratio_whole_step=statistics.median(ratios),
      ratio_less_aug=(peer_seconds / ours_model_seconds if ours_model_seconds > 0
                      else float('nan')))
  common = f'| {args.arch} | {args.image_size} | {args.batch} | {args.queue} | float32'
  rows = [
      f"| official PyTorch (their builder + loop body) {common} | {peer.info['device']} "
      f'| {1000 * peer_seconds:.1f} | {args.batch / peer_seconds:.1f} '
      '| pre-augmented float input; .cuda() -> identity |',
      f"| moco_jax (whole train step) {common} | {ours.info['device']} "
      f'| {1000 * ours_seconds:.1f} | {args.batch / ours_seconds:.1f} '
      '| uint8 input, augmentation inside the step |',
      f"| moco_jax (step less augmentation) {common} | {ours.info['device']} "
      f'| {1000 * ours_model_seconds:.1f} | {args.batch / ours_model_seconds:.1f} '
      f"| augmentation alone: {1000 * aug['step_seconds']:.1f} ms (separate process) |",
  ]
  summary = (f"ours / peer (images/s): {result['ratio_whole_step']:.2f}x whole step (median of "
             f"{args.rounds} alternating windows of {args.steps} steps; per window: "
             f"{', '.join(f'{r:.2f}' for r in ratios)}), {result['ratio_less_aug']:.2f}x "
             'ours less our augmentation.')
  print(PEER_HEADER)
  print('\n'.join(rows))
  print(summary)
  if args.append_docs:
    sys.path.insert(0, os.path.join(_ROOT, 'benchmarks'))
    import bench_train  # pylint: disable=g-import-not-at-top
    note = f'{summary} Peer commit {PEER_COMMIT}. 2-core shared CPU, numbers indicative only.'
    bench_train.append_docs(rows, _command(), note=note, path=args.docs_path,
                            section=DOCS_SECTION, header=PEER_HEADER)
  return result


# ---------------------------------------------------------------------------
# GPU: the peer's own training script.

# main_moco.py's progress line: "Epoch: [0][ 10/ 36]\tTime  0.412 ( 0.530)\tData ...".
_LOG_LINE = re.compile(r'Epoch: \[(\d+)\]\[\s*(\d+)/\s*(\d+)\]\s+Time\s+([\d.]+)\s+\(\s*([\d.]+)\)'
                       r'\s+Data\s+([\d.]+)')


def parse_log(text: str, batch: int, skip: int = 10) -> dict:
  """Images/s of a main_moco.py log run with --print-freq 1.

  Each progress line holds that step's wall time (data wait included) and
  data wait; the first `skip` steps (cuDNN autotuning, worker start-up) are
  dropped, as is the first step of each later epoch (workers restart).
  """
  steps = []
  for match in _LOG_LINE.finditer(text):
    epoch, index = int(match.group(1)), int(match.group(2))
    steps.append((epoch, index, float(match.group(4)), float(match.group(6))))
  kept = [s for n, s in enumerate(steps) if n >= skip and s[1] != 0]
  if not kept:
    raise ValueError(f'Fewer than {skip + 1} progress lines in the log: run main_moco.py with '
                     '--print-freq 1 and at least one full epoch.')
  step_seconds = statistics.mean(s[2] for s in kept)
  data_seconds = statistics.mean(s[3] for s in kept)
  return dict(steps=len(kept), step_seconds=step_seconds, data_seconds=data_seconds,
              images_per_second=batch / step_seconds,
              compute_images_per_second=batch / max(step_seconds - data_seconds, 1e-9))


def prepare_data(data_dir: str = DATA_DIR, archive: str = DATA_ARCHIVE) -> str:
  """Extracts Imagenette (128 px) once; returns the root holding train/ and val/."""
  root = os.path.join(data_dir, 'imagenette2-128sq')
  if not os.path.isdir(os.path.join(root, 'train')):
    os.makedirs(data_dir, exist_ok=True)
    with tarfile.open(archive) as tar:
      tar.extractall(data_dir, filter='data')
  return root


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def gpu_command(args, data_root: str) -> list[str]:
  """main_moco.py's MoCo v2 command line, one GPU, multiprocessing DDP."""
  return [
      args.torch_python, os.path.abspath(__file__), '_peer_main', '--',
      '-a', args.arch, '--lr', str(0.03 * args.batch / 256), '--batch-size', str(args.batch),
      '--moco-k', str(args.queue), '--mlp', '--moco-t', '0.2', '--aug-plus', '--cos',
      '--epochs', str(args.epochs), '--print-freq', '1', '--workers', str(args.workers),
      '--dist-url', f'tcp://127.0.0.1:{_free_port()}', '--multiprocessing-distributed',
      '--world-size', '1', '--rank', '0', data_root]


def run_gpu(args) -> dict:
  """Runs main_moco.py for `--epochs` epochs and reads images/s from its log."""
  _check_peer()
  data_root = (os.path.join(args.data_dir, 'imagenette2-128sq') if args.dry_run
               else prepare_data(args.data_dir, args.archive))
  cmd = gpu_command(args, data_root)
  env = dict(os.environ, PYTHONPATH=PEER_DIR,
             **{_PATCH_ENV: json.dumps({'crop': args.crop, 'amp': args.amp})})
  print('+', ' '.join(cmd), flush=True)
  if args.dry_run:
    return {}
  with tempfile.TemporaryDirectory() as workdir:  # main_moco.py saves checkpoints to cwd.
    proc = subprocess.run(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  log_path = args.log or os.path.join(_ROOT, '.peer', f'main_moco_{args.arch}_{args.crop}_{args.amp}.log')
  with open(log_path, 'w') as f:
    f.write(proc.stdout)
  if proc.returncode:
    raise SystemExit(f'main_moco.py failed ({proc.returncode}); log: {log_path}')
  result = parse_log(proc.stdout, args.batch)
  print(json.dumps(result))
  device = subprocess.run(
      [args.torch_python, '-c', 'import torch; print(torch.cuda.get_device_name(0), '
       '"torch", torch.__version__)'], check=True, stdout=subprocess.PIPE, text=True).stdout.strip()
  dtype = 'bf16 autocast' if args.amp == 'bf16' else 'float32'
  row = (f'| official main_moco.py (one-GPU DDP, {args.workers} loader workers) | {args.arch} '
         f'| {args.crop} | {args.batch} | {args.queue} | {dtype} | {device} '
         f"| {1000 * result['step_seconds']:.1f} | {result['images_per_second']:.1f} "
         f"| data wait {1000 * result['data_seconds']:.1f} ms/step; without it "
         f"{result['compute_images_per_second']:.1f} img/s; {result['steps']} steps |")
  print(PEER_HEADER)
  print(row)
  if args.append_docs:
    sys.path.insert(0, os.path.join(_ROOT, 'benchmarks'))
    import bench_train  # pylint: disable=g-import-not-at-top
    bench_train.append_docs(
        [row], _command(),
        note=f'Peer commit {PEER_COMMIT}; Imagenette 128 px JPEGs (../shared/data).',
        path=args.docs_path, section=DOCS_SECTION, header=PEER_HEADER)
  result['row'] = row
  return result


def peer_main(argv):
  """main_moco.py under our patches; children re-import this file (spawn)."""
  sys.path.insert(0, PEER_DIR)
  import main_moco  # pylint: disable=g-import-not-at-top
  sys.argv = [os.path.join(PEER_DIR, 'main_moco.py')] + argv
  main_moco.main()


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('mode', choices=('cpu', 'gpu', 'parse', '_peer_cpu', '_ours_cpu',
                                       '_ours_aug', '_peer_main', '_peer_step'))
  parser.add_argument('log_file', nargs='?', help='parse: a main_moco.py log.')
  parser.add_argument('--torch_python', default='/tmp/peervenv/bin/python',
                      help='python of the venv that has torch and torchvision.')
  parser.add_argument('--arch', default='resnet18', choices=('resnet18', 'resnet50'))
  parser.add_argument('--image_size', type=int, default=64, help='cpu: input px.')
  parser.add_argument('--batch', type=int, default=None,
                      help='global batch (default: cpu 32, gpu 256).')
  parser.add_argument('--queue', type=int, default=None,
                      help='K (default: cpu 4096, gpu 65536, as main_moco.py).')
  parser.add_argument('--steps', type=int, default=3, help='cpu: timed steps per window.')
  parser.add_argument('--rounds', type=int, default=5, help='cpu: alternating windows each.')
  parser.add_argument('--warmup', type=int, default=2, help='cpu: untimed steps.')
  parser.add_argument('--crop', type=int, default=224, help='gpu: RandomResizedCrop size.')
  parser.add_argument('--amp', default='none', choices=('none', 'bf16'),
                      help='gpu, _peer_step: autocast.')
  parser.add_argument('--device', default='cuda', choices=('cuda', 'cpu'),
                      help='_peer_step: where the peer\'s step runs (gpu_check.py).')
  parser.add_argument('--epochs', type=int, default=2, help='gpu: epochs of Imagenette.')
  parser.add_argument('--workers', type=int, default=os.cpu_count() or 8,
                      help='gpu: DataLoader workers.')
  parser.add_argument('--data_dir', default=DATA_DIR, help='gpu: where Imagenette is extracted.')
  parser.add_argument('--archive', default=DATA_ARCHIVE, help='gpu: the Imagenette archive.')
  parser.add_argument('--log', default=None, help='gpu: where to keep the log.')
  parser.add_argument('--dry_run', action='store_true', help='gpu: print the command only.')
  parser.add_argument('--append_docs', action='store_true', help='append the table to the docs.')
  parser.add_argument('--docs_path', default=os.path.join(_ROOT, 'docs', 'benchmarks.md'),
                      help='the file --append_docs writes (on a GPU machine: under $OUT; merge '
                      'it here with bench_train.py --merge_docs).')
  args = parser.parse_args(argv)
  gpu_like = args.mode in ('gpu', 'parse', '_peer_main')
  if args.batch is None:
    args.batch = 256 if gpu_like else 32
  if args.queue is None:
    args.queue = 65536 if gpu_like else 4096
  return args


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if argv and argv[0] == '_peer_main':
    rest = argv[1:]
    peer_main(rest[1:] if rest and rest[0] == '--' else rest)
    return None
  args = parse_args(argv)
  if args.mode == '_peer_cpu':
    return peer_cpu_server(args)
  if args.mode == '_ours_cpu':
    return ours_cpu_server(args)
  if args.mode == '_ours_aug':
    print(json.dumps(ours_aug_worker(args)), flush=True)
    return None
  if args.mode == '_peer_step':
    print(json.dumps(peer_step_worker(args)), flush=True)
    return None
  if args.mode == 'cpu':
    return run_cpu(args)
  if args.mode == 'parse':
    with open(args.log_file) as f:
      result = parse_log(f.read(), args.batch)
    print(json.dumps(result))
    return result
  return run_gpu(args)


if __name__ == '__main__':
  main()
