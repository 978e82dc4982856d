"""Runs realistic bad inputs through `python main.py` and prints a table of the outcomes.

  python tools/bad_inputs.py [--only SUBSTRING] [--second] [--devices 8] > table.md   # ~10-20 min on 2 cores

Each case builds its files (image trees, archives, checkpoints) in a temporary
directory, runs main.py as a user would, and classifies what happened:

  clean    the expected ending: one `Error (<kind>): ...` line, exit code 2, no
           traceback (or, for inputs that must work, exit 0 with the skip counted)
  TRACE    a Python traceback reached the user
  NOISE    a library's warning reached the user (grain's leaked shared memory)
  SILENT   exit 0 where the input should have been refused, or no count of a skip
  WROTE    refused cleanly, but WORKDIR changed (a refusal must change nothing on disk)
  HANG     still running after --timeout seconds
  other    any other ending (wrong exit code, message missing)

The tests in tests/test_reliability.py cover the same items; this is the
user's view, used for the table in docs/reliability.md.
"""

import argparse
import hashlib
import io
import os
import resource
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config=configs/tiny.py']
SMALL_RUN = ['--config.num_train_steps=4', '--config.checkpoint_every_steps=2',
             '--config.log_every_steps=1', '--config.tensorboard=False']
# A folder dataset of 12 images: batch 8 over 8 devices.
FOLDER_RUN = ['--config.batch_size=8', '--config.moco.queue_size=16',
              '--config.num_train_steps=2', '--config.checkpoint_every_steps=2',
              '--config.log_every_steps=1', '--config.tensorboard=False']


def _png(seed, side=40):
  pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format='PNG')
  return buf.getvalue()


def _png16():
  buf = io.BytesIO()
  Image.fromarray(np.tile(np.linspace(0, 65535, 48), (48, 1)).astype(np.uint16)).save(
      buf, format='PNG')
  return buf.getvalue()


def _tiff_float():
  buf = io.BytesIO()
  Image.fromarray(np.tile(np.linspace(0, 1, 48), (48, 1)).astype(np.float32)).save(
      buf, format='TIFF')
  return buf.getvalue()


def _tree(root, top='top', per_class=6, extras=None):
  """root/top/train/{a,b}/*.png (+ extras: {relative name: bytes})."""
  for c, cls in enumerate(('a', 'b')):
    folder = os.path.join(root, top, 'train', cls)
    os.makedirs(folder, exist_ok=True)
    for i in range(per_class):
      with open(os.path.join(folder, f'{i}.png'), 'wb') as f:
        f.write(_png(10 * c + i))
  for name, data in (extras or {}).items():
    path = os.path.join(root, top, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(data)
  return os.path.join(root, top)


def _tgz(tmp, src, name='data.tgz'):
  path = os.path.join(tmp, name)
  with tarfile.open(path, 'w:gz') as tar:
    tar.add(src, arcname=os.path.basename(src))
  return path


_FSIZE = 'RLIMIT_FSIZE='  # An argv item 'RLIMIT_FSIZE=<bytes>': run main.py under that limit.
_HELD = []  # Sockets a case keeps bound while it runs (a busy port).


def _limit_file_size(limit):
  return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def _main(args, timeout, devices):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  limits = [int(a[len(_FSIZE):]) for a in args if a.startswith(_FSIZE)]
  args = [a for a in args if not a.startswith(_FSIZE)]
  start = time.time()
  try:
    proc = subprocess.run([sys.executable, 'main.py', *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=_limit_file_size(limits[0]) if limits else None)
  except subprocess.TimeoutExpired:
    return None, '', time.time() - start
  return proc.returncode, proc.stderr, time.time() - start


def _train(tmp, name, extra=()):
  """A finished 4-step tiny run in tmp/name (checkpoints at 2 and 4)."""
  workdir = os.path.join(tmp, name)
  return workdir, ['--mode=train', *TINY, f'--workdir={workdir}', *SMALL_RUN, *extra]


def _add_image(src):
  """A prepare command that adds one more image to `src`'s train/a (between a run and its resume)."""
  return ['-c', f'import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); '
                f'import bad_inputs, os; open(os.path.join({src!r}, "train", "a", "new.png"), '
                '"wb").write(bad_inputs._png(99))']


# Each case: (group, description, setup(tmp) -> (prepare commands, args), expect).
# expect: 'error' (one clean message, exit 2) or a substring that a successful run
# (exit 0) must print (the counted skip / the warning).


def cases():
  wd = lambda tmp: f'--workdir={os.path.join(tmp, "w")}'
  c = []
  add = lambda group, what, setup, expect='error': c.append((group, what, setup, expect))
  # Flags and config values.
  add('flags', 'override typo --config.moco.queue=4',
      lambda t: ([], [*TINY, wd(t), '--config.moco.queue=4']))
  add('flags', 'section typo --config.mocoo.queue_size=4',
      lambda t: ([], [*TINY, wd(t), '--config.mocoo.queue_size=4']))
  add('flags', 'wrong type --config.batch_size=abc',
      lambda t: ([], [*TINY, wd(t), '--config.batch_size=abc']))
  add('flags', 'unknown flag --bogus=1', lambda t: ([], [*TINY, wd(t), '--bogus=1']))
  add('flags', 'missing config file', lambda t: ([], ['--config=configs/nope.py', wd(t)]))
  add('flags', 'no --workdir', lambda t: ([], [*TINY]))
  for override in ('eval.knn_k=0', 'eval.knn_temperature=0', 'num_train_steps=-5',
                   'data.cache_size=16', 'aug.crop_scale=(1.0,0.2)', 'aug.crop_ratio=(0.0,1.0)',
                   'aug.jitter_prob=1.5', 'aug.blur_prob=-0.1', 'keep_checkpoints=0',
                   'batch_size=60', 'moco.queue_size=32', 'optim.base_lr=0',
                   'eval.linear_epochs=0', 'optim.step_epochs=(160,120)'):
    add('config', f'--config.{override}',
        lambda t, o=override: ([], [*TINY, wd(t), f'--config.{o}']))
  # Data.
  add('data', 'data.path does not exist',
      lambda t: ([], [*TINY, wd(t), '--config.data.path=/nonexistent/imagenette.tgz']))

  def zip_file(t):
    path = os.path.join(t, 'data.zip')
    with open(path, 'wb') as f:
      f.write(b'PK\x03\x04')
    return [], [*TINY, wd(t), f'--config.data.path={path}']
  add('data', 'data.path is a .zip', zip_file)

  def truncated(t):
    path = _tgz(t, _tree(t))
    data = open(path, 'rb').read()
    with open(path, 'wb') as f:
      f.write(data[:len(data) // 2])
    return [], [*TINY, wd(t), f'--config.data.path={path}', *FOLDER_RUN]
  add('data', 'truncated .tgz', truncated)

  def no_train(t):
    root = _tree(t)
    os.rename(os.path.join(root, 'train'), os.path.join(root, 'training'))
    return [], [*TINY, wd(t), f'--config.data.path={root}', *FOLDER_RUN]
  add('data', 'tree without a train/ folder', no_train)

  def empty_class(t):
    root = _tree(t)
    os.makedirs(os.path.join(root, 'train', 'zebra'))
    return [], [*TINY, wd(t), f'--config.data.path={root}', *FOLDER_RUN]
  add('data', 'empty class folder', empty_class)

  def unreadable(t):
    root = os.path.join(t, 'junk')
    os.makedirs(os.path.join(root, 'train', 'a'))
    for i in range(3):
      with open(os.path.join(root, 'train', 'a', f'{i}.jpg'), 'wb') as f:
        f.write(b'not a jpeg')
    return [], [*TINY, wd(t), f'--config.data.path={root}', *FOLDER_RUN]
  add('data', 'no readable image at all', unreadable)

  def too_small(t):
    return [], [*TINY, wd(t), f'--config.data.path={_tree(t)}', '--config.num_train_steps=2']
  add('data', 'batch_size larger than the dataset', too_small)

  def readme_archive(t):
    src = _tree(t, extras={'train/README.txt': b'class folders beside me', 'LICENSE': b'CC'})
    return [], [*TINY, wd(t), f'--config.data.path={_tgz(t, src)}', *FOLDER_RUN]
  add('data', 'README.txt beside the class folders (archive)', readme_archive,
      'Ignored 2 files')

  def readme_tree(t):
    src = _tree(t, extras={'train/README.txt': b'x', 'train/a/notes.txt': b'not an image'})
    return [], [*TINY, wd(t), f'--config.data.path={src}', *FOLDER_RUN]
  add('data', 'README.txt beside class folders, notes.txt in one (tree)', readme_tree,
      'Skipped 1 of 13 files')

  def deep_images(t):
    src = _tree(t, extras={'train/a/ramp16.png': _png16(), 'train/b/ramp.tif': _tiff_float()})
    return [], [*TINY, wd(t), f'--config.data.path={src}', *FOLDER_RUN]
  add('data', '16-bit PNG and float TIFF among the images', deep_images, 'step 2')

  add('data', 'tfds name typo (cifar1O)',
      lambda t: ([], [*TINY, wd(t), '--config.data.source=tfds', '--config.data.name=cifar1O',
                      f'--config.data.data_dir={t}']))
  add('data', 'tfds dataset not prepared',
      lambda t: ([], [*TINY, wd(t), '--config.data.source=tfds',
                      '--config.data.name=imagenette/160px-v2', f'--config.data.data_dir={t}']))
  # Workdirs and checkpoints.

  def workdir_file(t):
    path = os.path.join(t, 'file')
    open(path, 'w').close()
    return [], [*TINY, f'--workdir={path}', *SMALL_RUN]
  add('checkpoints', 'workdir is a file', workdir_file)

  def checkpoints_file(t):
    os.makedirs(os.path.join(t, 'w'))
    open(os.path.join(t, 'w', 'checkpoints'), 'w').close()
    return [], [*TINY, wd(t), *SMALL_RUN]
  add('checkpoints', 'WORKDIR/checkpoints is a file', checkpoints_file)

  def resume_changed(extra, expect_tag):
    def setup(t):
      workdir, first = _train(t, 'run')
      return [first], [*TINY, f'--workdir={workdir}', *SMALL_RUN, *extra]
    return setup
  add('checkpoints', 'resume with another batch_size',
      resume_changed(['--config.batch_size=32', '--config.moco.queue_size=256'], ''))
  add('checkpoints', 'resume with another model width', resume_changed(['--config.model.width=16'], ''))
  add('checkpoints', 'resume with another seed', resume_changed(['--config.seed=1'], ''))
  add('checkpoints', 'resume with num_train_steps below the checkpoint',
      resume_changed(['--config.num_train_steps=2'], ''))
  add('checkpoints', 'resume with allow_config_change=True (seed)',
      resume_changed(['--config.seed=1', '--config.allow_config_change=True',
                      '--config.num_train_steps=6'], ''), 'changed config')

  def corrupt_latest(t):
    workdir, first = _train(t, 'run')
    script = (f'import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); '
              f'import corrupt_reruns; '
              f'corrupt_reruns.garbage_chunks({os.path.join(workdir, "checkpoints", "4")!r})')
    return [first, ['-c', script]], [*TINY, f'--workdir={workdir}', *SMALL_RUN]
  add('checkpoints', 'corrupt latest checkpoint (falls back, moves it aside)', corrupt_latest,
      'does not restore')

  def diverge(t):
    workdir, first = _train(t, 'run')
    return [first], [*TINY, f'--workdir={workdir}', *SMALL_RUN, '--config.num_train_steps=10',
                     '--config.optim.base_lr=1e9']
  add('checkpoints', 'base_lr=1e9 after a good start (diverges)', diverge)

  def rerun_after_divergence(t):
    workdir, first = _train(t, 'run')
    bad = [*TINY, f'--workdir={workdir}', *SMALL_RUN, '--config.num_train_steps=10',
           '--config.optim.base_lr=1e9']
    return [first, ['!'] + bad], [*TINY, f'--workdir={workdir}', *SMALL_RUN,
                                  '--config.num_train_steps=10']
  add('checkpoints', 'rerun with a sane lr after the divergence', rerun_after_divergence,
      'step 10')
  add('checkpoints', '--mode=knn without checkpoints',
      lambda t: ([], ['--mode=knn', *TINY, wd(t)]))

  def knn_other_model(t):
    workdir, first = _train(t, 'run')
    return [first], ['--mode=knn', *TINY, f'--workdir={workdir}', '--config.model.width=16']
  add('checkpoints', '--mode=knn with another model than the checkpoint', knn_other_model)
  # Added after the first measurement.

  def all_corrupt(t):
    workdir, first = _train(t, 'run')
    dirs = [os.path.join(workdir, 'checkpoints', s) for s in ('2', '4')]
    script = (f'import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); '
              f'import corrupt_reruns; [corrupt_reruns.garbage_chunks(d) for d in {dirs!r}]')
    return [first, ['-c', script]], [*TINY, f'--workdir={workdir}', *SMALL_RUN]
  add('checkpoints', 'every checkpoint corrupt', all_corrupt)

  def no_config_json(t):
    workdir, first = _train(t, 'run')
    script = f'import os; os.remove({os.path.join(workdir, "config.json")!r})'
    return [first, ['-c', script]], [*TINY, f'--workdir={workdir}', *SMALL_RUN,
                                     '--config.model.embed_dim=32']
  add('checkpoints', 'resume with another embed_dim, config.json deleted', no_config_json)
  add('checkpoints', '--mode=export without checkpoints',
      lambda t: ([], ['--mode=export', *TINY, wd(t)]))
  add('config', '--config.data.source=folder without data.path',
      lambda t: ([], [*TINY, wd(t), '--config.data.source=folder']))
  add('config', '--config.data.image_size=0',
      lambda t: ([], [*TINY, wd(t), '--config.data.image_size=0']))
  _transfer_cases(add, wd)
  c.extend(second_catalogue())
  c.extend(third_catalogue())
  return c


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _busy_port() -> int:
  s = socket.socket()
  s.bind(('127.0.0.1', 0))
  s.listen()
  _HELD.append(s)
  return s.getsockname()[1]


def second_catalogue():
  """Issue 18: streaming, many processes, evaluation modes, disk, config values."""
  c = []
  add = lambda group, what, setup, expect='error': c.append((group, what, setup, expect))
  wd = lambda tmp: f'--workdir={os.path.join(tmp, "w")}'
  stream = ['--config.data.max_in_memory_gb=0']

  def streamed_odd_images(t):
    src = _tree(t, extras={'train/a/ramp16.png': _png16(), 'train/b/ramp.tif': _tiff_float()})
    return [], [*TINY, wd(t), f'--config.data.path={src}', *FOLDER_RUN, *stream]
  add('streaming', '16-bit PNG and float TIFF in a streamed folder', streamed_odd_images,
      'step 2')

  def files_added_before_resume(t):
    src = _tree(t)
    workdir = os.path.join(t, 'run')
    first = [*TINY, f'--workdir={workdir}', f'--config.data.path={src}', *FOLDER_RUN, *stream]
    return [first, _add_image(src)], [*first, '--config.num_train_steps=4']
  add('streaming', 'files added to a streamed folder between a run and its resume',
      files_added_before_resume)

  def report_streamed(t):
    src = _tree(t)
    workdir = os.path.join(t, 'run')
    first = [*TINY, f'--workdir={workdir}', f'--config.data.path={src}', *FOLDER_RUN, *stream]
    return [first], ['--mode=report', f'--workdir={workdir}']
  add('streaming', '--mode=report on a streamed run', report_streamed)

  def many_loader_processes(t):
    return [], [*TINY, wd(t), f'--config.data.path={_tree(t)}', *FOLDER_RUN, *stream,
                '--config.data.stream_processes=32']
  add('streaming', 'data.stream_processes=32 on a small machine (capped)', many_loader_processes,
      'loader processes')
  # Many processes (each case starts one process; timeouts short).
  dist = ['--num_processes=2', '--initialization_timeout=5']
  add('distributed', '--process_id=2 --num_processes=2',
      lambda t: ([], [*TINY, wd(t), *dist, '--process_id=2',
                      f'--coordinator_address=127.0.0.1:{_free_port()}']))
  add('distributed', 'process 0 started, process 1 never',
      lambda t: ([], [*TINY, wd(t), *dist, '--process_id=0',
                      f'--coordinator_address=127.0.0.1:{_free_port()}']))
  add('distributed', 'coordinator port already in use',
      lambda t: ([], [*TINY, wd(t), *dist, '--process_id=0',
                      f'--coordinator_address=127.0.0.1:{_busy_port()}']))
  add('distributed', 'process 1 with no coordinator running',
      lambda t: ([], [*TINY, wd(t), *dist, '--process_id=1',
                      f'--coordinator_address=127.0.0.1:{_free_port()}']))
  add('distributed', '--coordinator_address without a port',
      lambda t: ([], [*TINY, wd(t), *dist, '--process_id=1', '--coordinator_address=localhost']))
  # Evaluation modes.

  def trained(extra_prepare=None):
    def setup(t, extra_prepare=extra_prepare):
      workdir, first = _train(t, 'run')
      prepare = [first] + ([['-c', extra_prepare(workdir)]] if extra_prepare else [])
      return prepare, workdir
    return setup

  def broken_json(name):
    """Writes a JSON object cut short over WORKDIR/name (as a hand edit or a full disk leaves it)."""
    return lambda workdir: (f'open({os.path.join(workdir, name)!r}, "w").write('
                            + repr('{"knn_top1": 3,') + ')')

  def knn_with(extra_prepare, extra_args=()):
    def setup(t):
      prepare, workdir = trained(extra_prepare)(t)
      return prepare, ['--mode=knn', f'--workdir={workdir}', *extra_args]
    return setup
  add('evaluation', '--mode=knn with a hand-broken config.json', knn_with(broken_json('config.json')))
  add('evaluation', '--mode=knn with a broken eval.json', knn_with(broken_json('eval.json')))
  add('evaluation', '--mode=knn with knn_k=5000 on a 256-image split',
      knn_with(None, ['--config.eval.knn_k=5000']), 'using k=256')
  add('evaluation', '--mode=knn on an empty directory', lambda t: ([], ['--mode=knn', wd(t)]))
  add('evaluation', '--mode=linear_eval with --config.eval.knn_k=0 (validated first)',
      lambda t: ([], ['--mode=linear_eval', *TINY, wd(t), '--config.eval.knn_k=0']))
  # Disk and config values.
  add('checkpoints', 'checkpoint save over a file-size limit (ulimit -f)',
      lambda t: ([], [*TINY, wd(t), *SMALL_RUN, f'{_FSIZE}{200 * 1024}']))
  add('config', '--config.seed=-1', lambda t: ([], [*TINY, wd(t), '--config.seed=-1']))
  _mechanism_cases(add, wd, stream)
  _pack_cases(add, wd, stream)
  return c


def third_catalogue():
  """Issue 32: refusals change nothing, validation covers what the code rejects, outputs that
  exist as the wrong thing, data under a memory bank, non-finite weights."""
  c = []
  add = lambda group, what, setup, expect='error': c.append((group, what, setup, expect))
  wd = lambda tmp: f'--workdir={os.path.join(tmp, "w")}'
  # Values the config check refuses before any work (each section checked by its owner).
  for what, flags in [
      ('a ViT name under method=moco', ['--config.model.name=vit_small']),
      ('data.cache_ratio=nan', ['--config.data.cache_ratio=nan']),
      ('data.cache_ratio=0.5 (decoded below the input size)', ['--config.data.cache_ratio=0.5']),
      ('data.max_in_memory_gb=nan', ['--config.data.max_in_memory_gb=nan']),
      ('data.train_split empty', ['--config.data.train_split=']),
      ('data.synthetic_classes=0', ['--config.data.synthetic_classes=0']),
      ('aug.jitter_prob=inf', ['--config.aug.jitter_prob=inf']),
      ('aug.std with a zero', ['--config.aug.std=(0.2, 0.0, 0.2)']),
      ('optim.base_lr=nan', ['--config.optim.base_lr=nan']),
      ('optim.warmup_epochs=-1', ['--config.optim.warmup_epochs=-1']),
      ('optim.momentum=inf', ['--config.optim.momentum=inf']),
      ('model.mlp_dim=0', ['--config.model.mlp_dim=0']),
      ('model.patch_size=-3', ['--config.model.patch_size=-3']),
      ('moco.temperature=nan', ['--config.moco.temperature=nan']),
      ('mocov3.temperature=inf under method=mocov3',
       ['--config.method=mocov3', '--config.mocov3.temperature=inf']),
      ('memory_bank.momentum=nan under method=memory_bank',
       ['--config.method=memory_bank', '--config.memory_bank.momentum=nan']),
      ('eval.linear_holdout=0', ['--config.eval.linear_holdout=0']),
      ('eval.linear_lrs empty', ['--config.eval.linear_lrs=()']),
      ('eval.knn_temperature=inf', ['--config.eval.knn_temperature=inf']),
      ('report.tsne_points=-1', ['--config.report.tsne_points=-1']),
      ('export.format=onnx (checked before pretraining)', ['--config.export.format=onnx'])]:
    add('validation', what, lambda t, flags=flags: ([], [*TINY, wd(t), *flags]))
  # Resumes refused before WORKDIR is written (classify compares its digest before and after).
  def resume(*flags, prepare=None):
    def setup(t):
      workdir, first = _train(t, 'run')
      extra = [['-c', prepare(workdir)]] if prepare else []
      return [first, *extra], [*first, *flags]
    return setup
  add('refusal', 'resume with another seed', resume('--config.seed=3'))
  add('refusal', 'resume with another queue size, change allowed (shapes refuse)',
      resume('--config.moco.queue_size=300', '--config.allow_config_change=True'))
  add('refusal', 'resume with num_train_steps below the checkpoint',
      resume('--config.num_train_steps=2', '--config.checkpoint_every_steps=1'))
  add('refusal', 'resume with batch 512 on 256 images, change allowed',
      resume('--config.batch_size=512', '--config.moco.queue_size=1024',
             '--config.allow_config_change=True'))
  def nan_weight(t):
    workdir, first = _train(t, 'run')
    return [first, ['-c', _nan_checkpoint(workdir)]], ['--mode=knn', f'--workdir={workdir}']
  add('weights', '--mode=knn on a checkpoint with a NaN weight', nan_weight)

  def bank(change):
    def setup(t):
      src = _tree(t)
      first = [*TINY, f'--workdir={os.path.join(t, "run")}', f'--config.data.path={src}',
               *FOLDER_RUN, '--config.method=memory_bank', '--config.memory_bank.num_negatives=8']
      return [first, ['-c', change(src)]], [*first, '--config.num_train_steps=4']
    return setup
  add('refusal', 'memory bank in memory: one image replaced before the resume',
      bank(lambda src: f'import shutil; shutil.copy({os.path.join(src, "train/a/1.png")!r}, '
                       f'{os.path.join(src, "train/a/0.png")!r})'))
  add('refusal', 'memory bank in memory: one image moved to the other class',
      bank(lambda src: f'import os; os.rename({os.path.join(src, "train/a/0.png")!r}, '
                       f'{os.path.join(src, "train/b/moved.png")!r})'))
  # Outputs that exist as the wrong thing.
  def workdir_as(kind):
    def setup(t):
      path = os.path.join(t, 'w')
      script = {'file': f'open({path!r}, "w").write("x")',
                'link': f'import os; os.symlink({os.path.join(t, "gone")!r}, {path!r})',
                'checkpoints file': f'import os; os.makedirs({path!r}); '
                                    f'open({os.path.join(path, "checkpoints")!r}, "w").close()'}[kind]
      return [['-c', script]], [*TINY, f'--workdir={path}', *SMALL_RUN]
    return setup
  add('outputs', 'WORKDIR is a file', workdir_as('file'))
  add('outputs', 'WORKDIR is a dangling symlink', workdir_as('link'))
  add('outputs', 'WORKDIR/checkpoints is a file', workdir_as('checkpoints file'))

  def trained_then(mode, blocker):
    def setup(t):
      workdir, first = _train(t, 'run')
      target = os.path.join(workdir, blocker)
      return [first, ['-c', f'import os; os.makedirs({target!r}, exist_ok=True)']], [
          f'--mode={mode}', f'--workdir={workdir}']
    return setup
  add('outputs', '--mode=export with backbone_torchvision.npz a directory',
      trained_then('export', 'backbone_torchvision.npz'))
  add('outputs', '--mode=knn with eval.json a directory', trained_then('knn', 'eval.json'))
  add('outputs', '--mode=report with report/index.html a directory',
      trained_then('report', 'report/index.html'))

  def cache_dir_is_file(t):
    src = _tree(t)
    blocker = os.path.join(t, 'cache_file')
    return [['-c', f'open({blocker!r}, "w").write("x")']], [
        *TINY, wd(t), f'--config.data.path={src}', *FOLDER_RUN,
        f'--config.data.cache_dir={blocker}']
  add('outputs', 'data.cache_dir is a file (the file index needs it: refused naming the field)',
      cache_dir_is_file)
  _own_image_cases(add, wd)
  return c


def _flat(root, count=12, mode='RGB'):
  """root/img_NN.png: an unlabeled flat folder (issue 30)."""
  os.makedirs(root, exist_ok=True)
  for i in range(count):
    pixels = np.random.default_rng(i).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(os.path.join(root, f'img_{i:02d}.png'))
  return root


def _csv(root, rows):
  """root/list.csv with `rows` (lists of cells), beside a flat folder of 12 images."""
  _flat(root)
  path = os.path.join(root, 'list.csv')
  with open(path, 'w') as f:
    f.writelines(','.join(map(str, row)) + '\n' for row in rows)
  return path


def _own_image_cases(add, wd):
  """Issue 30: unlabeled folders, lists and channels, each refused with the field and the fix."""
  def run_on(make, *flags):
    return lambda t: ([], [*TINY, wd(t), f'--config.data.path={make(t)}', *FOLDER_RUN, *flags])

  def mixed(t):
    root = _flat(os.path.join(t, 'gray'), mode='L')
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(os.path.join(root, 'img_05.png'))
    return root
  add('own images', 'data.channels=1 on a folder with one RGB image among grayscale ones',
      run_on(mixed, '--config.data.channels=1', '--config.aug.mean=auto',
             '--config.aug.std=auto'))
  add('own images', 'a CSV list naming an image that does not exist',
      run_on(lambda t: _csv(os.path.join(t, 'l'), [['path'], *[[f'img_{i:02d}.png'] for i in
                                                                range(11)], ['gone.png']])))
  add('own images', 'an empty folder', run_on(lambda t: os.makedirs(os.path.join(t, 'e')) or
                                              os.path.join(t, 'e')))
  add('own images', 'data.labels=csv on a list without a label column',
      run_on(lambda t: _csv(os.path.join(t, 'l'), [['path'], *[[f'img_{i:02d}.png'] for i in
                                                                range(12)]]),
             '--config.data.labels=csv'))
  add('own images', 'data.val_fraction=0.01 of 12 images (an empty held-out split)',
      run_on(lambda t: _flat(os.path.join(t, 'f')), '--config.data.val_fraction=0.01'))
  add('own images', 'data.channels=13 with aug.mean of 3 values',
      run_on(lambda t: _flat(os.path.join(t, 'f')), '--config.data.channels=13'))

  def unlabeled_then(mode):
    def setup(t):
      first = [*TINY, f'--workdir={os.path.join(t, "run")}',
               f'--config.data.path={_flat(os.path.join(t, "f"), 20)}', *FOLDER_RUN,
               '--config.data.val_fraction=0.4']
      return [first], [f'--mode={mode}', f'--workdir={os.path.join(t, "run")}']
    return setup
  add('own images', '--mode=knn on a run trained on an unlabeled folder', unlabeled_then('knn'))
  add('own images', '--mode=linear_eval on a run trained on an unlabeled folder',
      unlabeled_then('linear_eval'))


def _nan_checkpoint(workdir):
  """A prepare script that writes NaN into the first parameter of the latest checkpoint."""
  return ('import os; os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"; '
          'os.environ["JAX_PLATFORMS"] = "cpu"; '  # The topology the checkpoint was saved with.
          'import sys, shutil, numpy as np, jax, orbax.checkpoint as ocp; '
          f'sys.path.insert(0, {ROOT!r}); '
          'from moco_jax.run import checkpoints; from configs import tiny; '
          f'm = checkpoints.create_manager({workdir!r}, tiny.get_config()); s = m.latest_step(); '
          't = jax.tree.map(np.asarray, m.restore(s)); '
          'l, d = jax.tree.flatten(t["params"]); l[0] = np.full_like(l[0], np.nan); '
          't["params"] = jax.tree.unflatten(d, l); '
          f'shutil.rmtree({workdir!r} + "/checkpoints/" + str(s)); m.reload(); '
          'm.save(s, args=ocp.args.StandardSave(t)); m.wait_until_finished()')
def _pack_cases(add, wd, stream):
  """Issue 29's packed shards: --mode=pack's refusals and damaged packed directories."""
  def pack_of(t):
    src, out = _tree(t), os.path.join(t, 'packed')
    return src, out, ['--mode=pack', *TINY, f'--config.data.path={src}', f'--workdir={out}']

  def into_non_empty(t):
    _, out, command = pack_of(t)
    os.makedirs(out)
    with open(os.path.join(out, 'notes.txt'), 'w') as f:
      f.write('mine')
    return [], command
  add('pack', '--mode=pack into a non-empty directory', into_non_empty)
  add('pack', '--mode=pack over a file-size limit (ulimit -f)',
      lambda t: ([], [*pack_of(t)[2], f'{_FSIZE}{64 * 1024}']))

  def damaged(how, mode_args):
    def setup(t):
      _, out, command = pack_of(t)
      shard = os.path.join(out, 'train-00000-of-00001.array_record')
      return [command, ['-c', how(shard, out)]], [
          *TINY, wd(t), f'--config.data.path={out}', *FOLDER_RUN, *mode_args]
    return setup
  truncate = lambda shard, out: (f'p={shard!r}; d=open(p, "rb").read(); '
                                 'open(p, "wb").write(d[:len(d) // 2])')
  # Flip one byte in the middle of the first record's image (the file keeps its size).
  corrupt = lambda shard, out: (f'p={shard!r}; d=bytearray(open(p, "rb").read()); '
                                'i=d.find(b"MJP1") + 400; d[i] ^= 255; open(p, "wb").write(d)')
  recount = lambda shard, out: (
      f'import json; p={os.path.join(out, "manifest.json")!r}; m=json.load(open(p)); '
      'm["splits"]["train"]["count"] += 1; json.dump(m, open(p, "w"))')
  add('pack', 'train on a packed directory with a truncated shard', damaged(truncate, []))
  add('pack', 'train (in memory) on a packed directory with a corrupt shard',
      damaged(corrupt, []))
  add('pack', 'train (streamed) on a packed directory with a corrupt shard',
      damaged(corrupt, stream))
  add('pack', '--mode=knn on a packed directory whose manifest does not match',
      damaged(recount, ['--mode=knn', '--config.eval.random_init=True']))


def _mechanism_cases(add, wd, stream):
  """Issue 21's methods (config.method): values, resumes that cannot hold, streamed runs."""
  add('mechanisms', '--config.method=end-to-end (typo)',
      lambda t: ([], [*TINY, wd(t), '--config.method=end-to-end']))
  add('mechanisms', 'method=memory_bank with memory_bank.num_negatives=0',
      lambda t: ([], [*TINY, wd(t), '--config.method=memory_bank',
                      '--config.memory_bank.num_negatives=0']))

  def bank_run(t, *extra):
    src = _tree(t)
    return [*TINY, f'--workdir={os.path.join(t, "run")}', f'--config.data.path={src}',
            *FOLDER_RUN, '--config.method=memory_bank', *extra]

  def bank_images_added(t):
    first = bank_run(t)
    return [first, _add_image(os.path.join(t, 'top'))], [*first, '--config.num_train_steps=4']
  add('mechanisms', 'memory_bank resumed after an image was added to its (in-memory) folder',
      bank_images_added)

  def bank_resumed_as_moco(t):
    first = bank_run(t)
    return [first], [*first, '--config.num_train_steps=4', '--config.method=moco']
  add('mechanisms', 'memory_bank run resumed with --config.method=moco', bank_resumed_as_moco)
  add('mechanisms', 'memory_bank on a streamed folder (the loader hands it indices)',
      lambda t: ([], bank_run(t, *stream)), 'step 2')
  add('mechanisms', 'end_to_end on a streamed folder',
      lambda t: ([], [*bank_run(t, *stream), '--config.method=end_to_end']), 'step 2')


def _transfer_cases(add, wd):
  """Issue 20's inputs: export format, official weights (config.init_from); the offline tfds
  download is 'tfds dataset not prepared' above."""
  add('transfer', '--mode=export --config.export.format=onnx',
      lambda t: ([], ['--mode=export', *TINY, wd(t), '--config.export.format=onnx']))
  add('transfer', '--mode=knn --config.init_from=a missing .pth.tar',
      lambda t: ([], ['--mode=knn', *TINY, wd(t),
                      f'--config.init_from={os.path.join(t, "moco_v2_800ep_pretrain.pth.tar")}']))

  def not_a_checkpoint(t):
    path = os.path.join(t, 'moco.pth.tar')
    return [['-c', f'open({path!r}, "wb").write(b"<html>not found</html>")']], [
        '--mode=knn', *TINY, wd(t), f'--config.init_from={path}']
  add('transfer', '--config.init_from=an HTML page saved as .pth.tar (torch or not)',
      not_a_checkpoint)


def _digest(directory) -> dict:
  """{relative path: sha256, 'dir' or 'link -> target'} of everything under `directory`."""
  if not directory or not os.path.lexists(directory):
    return {}
  if not os.path.isdir(directory) or os.path.islink(directory):
    return {'.': os.readlink(directory) if os.path.islink(directory) else 'file'}
  out = {}
  for root, dirs, names in os.walk(directory):
    for name in dirs + names:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory)
      if os.path.islink(path):
        out[rel] = f'link -> {os.readlink(path)}'
      elif os.path.isdir(path):
        out[rel] = 'dir'
      else:
        with open(path, 'rb') as f:
          out[rel] = hashlib.sha256(f.read()).hexdigest()
  return out


def classify(rc, stderr, expect):
  lines = [l for l in stderr.strip().splitlines() if l.strip()]
  last = lines[-1] if lines else ''
  if rc is None:
    return 'HANG', ''
  if 'Traceback' in stderr:
    return 'TRACE', last
  if 'leaked shared_memory' in stderr:  # A loader that did not release its memory.
    return 'NOISE', next(l for l in lines if 'leaked shared_memory' in l)
  if expect == 'error':
    if rc == 0:
      return 'SILENT', last
    if rc == 2 and last.startswith('Error ('):
      return 'clean', last
    return 'other', last
  if rc != 0:
    return 'other', last
  found = next((l for l in lines if expect in l), None)
  return ('clean', found) if found else ('SILENT', last)


def _shorten(line: str, limit: int = 230) -> str:
  line = line.split('] ', 1)[1] if line[:1] in 'IWE' and '] ' in line[:60] else line
  line = line.replace('|', '/')
  return line if len(line) <= limit else line[:limit] + '...'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--only', default='', help='run only cases whose text contains this, or of this kind')
  parser.add_argument('--timeout', type=int, default=300)
  parser.add_argument('--devices', type=int, default=8)
  parser.add_argument('--second', action='store_true',
                      help="only issue 18's second catalogue (streaming, many processes, ...)")
  parser.add_argument('--third', action='store_true',
                      help="only issue 32's third catalogue (refusals, validation, outputs)")
  args = parser.parse_args()
  rows, counts = [], {}
  first_of_second = len(cases()) - len(second_catalogue()) - len(third_catalogue()) + 1
  first_of_third = len(cases()) - len(third_catalogue()) + 1
  for n, (group, what, setup, expect) in enumerate(cases(), 1):
    chosen = not args.only or args.only in what or args.only == group
    if not chosen or (args.second and not first_of_second <= n < first_of_third) or (
        args.third and n < first_of_third):
      continue
    tmp = tempfile.mkdtemp(prefix='bad_inputs_')
    try:
      prepare, argv = setup(tmp)
      for command in prepare:
        if command[:1] == ['-c']:
          subprocess.run([sys.executable, *command], check=True, capture_output=True)
        else:
          allowed_to_fail = command[:1] == ['!']
          rc, err, _ = _main(command[1:] if allowed_to_fail else command, args.timeout,
                             args.devices)
          if rc != 0 and not allowed_to_fail:
            raise RuntimeError(f'setup run failed ({rc}): {err[-500:]}')
      workdir = next((a.split('=', 1)[1] for a in argv if a.startswith('--workdir=')), None)
      before = _digest(workdir)
      rc, stderr, seconds = _main(argv, args.timeout, args.devices)
      outcome, line = classify(rc, stderr, expect)
      if outcome == 'clean' and expect == 'error' and _digest(workdir) != before:
        outcome = 'WROTE'  # A refused command changed WORKDIR (issue 32).
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
      while _HELD:
        _HELD.pop().close()
    counts[outcome] = counts.get(outcome, 0) + 1
    row = f'| {n} | {group} | {what} | {outcome} | {rc} | {seconds:.0f} s | {_shorten(line)} |'
    rows.append(row)
    print(row, file=sys.stderr, flush=True)
  print('| # | kind | bad input | outcome | exit | time | last line the user sees |')
  print('| --- | --- | --- | --- | --- | --- | --- |')
  print('\n'.join(rows))
  print(f'\n{sum(counts.values())} inputs: ' + ', '.join(f'{v} {k}' for k, v in
                                                      sorted(counts.items())))


if __name__ == '__main__':
  main()
