"""What many test modules build: tiny configs, image trees, checkpoints, metrics rows.

Also the two random image ops that only tests draw from a key (the library draws
its uniforms once per example and calls `image_ops.*_from_uniforms`).
"""

import contextlib
import json
import os
import pathlib
import re
import signal
import subprocess
import time

import jax
import numpy as np
from PIL import Image
import pytest

from configs import default
from configs import tiny
from moco_jax.augmentation import image_ops
from moco_jax.core import parallel
from moco_jax.data import batching
from moco_jax.run import checkpoints
from moco_jax.training import optim
from moco_jax.training import step as step_lib
from moco_jax import pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def xla_flags(devices=None) -> str:
  """XLA_FLAGS for a run a test starts: the suite's (tests/conftest.py) with `devices` CPU devices
  (None: XLA's default, one)."""
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '', os.environ.get('XLA_FLAGS', ''))
  if devices is not None:
    flags += f' --xla_force_host_platform_device_count={devices}'
  return ' '.join(flags.split())


@contextlib.contextmanager
def xla_optimized():
  """Compiles with XLA's optimisations on, as users run, inside the block.

  The suite turns them off (tests/conftest.py: compiling is most of its time).
  The arithmetic is IEEE either way, but LLVM contracts other multiply-adds into
  FMAs, so float32 results move by a rounding or so: the official-code goldens,
  whose bounds are the official run's measured noise, are compared with the
  optimisations a user's run has (the suite's choice of emitters,
  conftest.COMPILE_FLAGS, stays: XLA reads its flags once per process). In-memory
  compiled programs are dropped on the way in and out, so nothing compiled at the
  other level is reused.
  """
  before = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', False)
  jax.clear_caches()
  try:
    yield
  finally:
    jax.config.update('jax_disable_most_optimizations', before)
    jax.clear_caches()


# --------------------------------------------------------------------------
# Configs.


def override(config, **overrides):
  """Sets `section__field=value` or `'section.field'=value` (any depth) in place."""
  for key, value in overrides.items():
    *path, field = key.replace('.', '__').split('__')
    node = config
    for name in path:
      node = node[name]
    node[field] = value
  return config


def tiny_config(variant: str = '', **overrides):
  """configs/tiny.py (`variant`: 'mocov3_resnet' | 'mocov3_vit') with `override`s."""
  return override(tiny.get_config(variant), **overrides)


def data_config(path='', **overrides):
  """configs/default.py's data section for a tree or archive at `path`, 32 px, 2 workers."""
  config = default.get_config().data
  config.update(dict(path=str(path), image_size=32, num_workers=2), **overrides)
  return config


def run_config(method, steps, num_negatives=100):
  """configs/tiny.py as a short run of `method`: `steps` steps, a checkpoint at the last, a
  metrics row per step (the mechanism, evaluation and multi-process modules' runs)."""
  return tiny_config(method=method, num_train_steps=steps, checkpoint_every_steps=steps,
                     log_every_steps=1, memory_bank__num_negatives=num_negatives)


# --------------------------------------------------------------------------
# Images on disk.


def photo(rng, width: int, height: int, blur: int = 16) -> Image.Image:
  """A smooth random RGB image (compresses and decodes like a photo, unlike white noise)."""
  small = rng.integers(0, 256, (max(2, height // blur), max(2, width // blur), 3), dtype=np.uint8)
  return Image.fromarray(small).resize((width, height), Image.BICUBIC)


def image_tree(root, splits=None, classes: int = 3, size=(40, 30), seed: int = 0,
               class_name: str = 'class{:04d}', ext: str = 'jpg', blur: int = 16,
               tint: int = 0) -> pathlib.Path:
  """ROOT/<split>/<class_name.format(c)>/<i>.<ext>: an ImageFolder tree of `photo`s.

  `splits`: {split: images per class} (default {'train': 6}); images alternate
  between `size` and its transpose (landscape, portrait); `tint` > 0 adds
  tint x (c + 1) to channel c % 3 of class c, so that classes differ.
  """
  root = pathlib.Path(root)
  rng = np.random.default_rng(seed)
  for split, count in (splits or {'train': 6}).items():
    for c in range(classes):
      folder = root / split / class_name.format(c)
      folder.mkdir(parents=True, exist_ok=True)
      for i in range(count):
        w, h = size if i % 2 else size[::-1]
        image = photo(rng, w, h, blur)
        if tint:
          pixels = np.asarray(image, np.int32)
          pixels[..., c % 3] = np.clip(pixels[..., c % 3] + tint * (c + 1), 0, 255)
          image = Image.fromarray(pixels.astype(np.uint8))
        image.save(folder / f'{i}.{ext}', **({'quality': 90} if ext.lower() in ('jpg', 'jpeg')
                                              else {}))
  return root


# --------------------------------------------------------------------------
# Checkpoints.


def fresh_state(config, devices=None, steps_per_epoch: int = 4):
  """The TrainState of `config` a run starts from, on `devices` (all), as pretraining builds it."""
  devices = jax.devices() if devices is None else devices
  lr = optim.create_learning_rate_fn(config, steps_per_epoch, config.num_train_steps)
  setup = step_lib.make_step_setup(config, len(devices), optim.create_optimizer(config, lr))
  return step_lib.init_state(config, setup, parallel.make_mesh(devices))


def write_checkpoint(config, workdir, step: int):
  """A real Orbax checkpoint of a fresh TrainState at `step`, saved as pretraining does."""
  state = fresh_state(config).replace(step=jax.numpy.asarray(step, jax.numpy.int32))
  manager = checkpoints.create_manager(str(workdir), config)
  checkpoints.save(manager, step, state)
  manager.wait_until_finished()
  manager.close()


def restore_checkpoint(workdir, config, step: int, devices=None, steps_per_epoch: int = 4):
  """Checkpoint `step` of WORKDIR restored as a TrainState of `config` on `devices` (all)."""
  target = fresh_state(config, devices, steps_per_epoch)
  manager = checkpoints.create_manager(str(workdir), config)
  try:
    return checkpoints.restore(manager, step, target)
  finally:
    manager.close()


# --------------------------------------------------------------------------
# Interrupted runs.


def sigkill_after_checkpoint(cmd, workdir, env, steps, checkpoint=4) -> bool:
  """Starts `cmd`, SIGKILLs it once checkpoint `checkpoint` exists; True if it had finished."""
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (workdir / 'checkpoints' / str(checkpoint)).is_dir() and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return (workdir / 'checkpoints' / str(steps)).is_dir()


def crash_after_checkpoint_and_rerun(config, workdir, monkeypatch, checkpoint: int):
  """Trains until checkpoint `checkpoint` is complete, dies at the next batch, reruns; the final state."""
  real_batches = batching.train_batches

  def crashing_batches(*args, **kwargs):
    for i, batch in enumerate(real_batches(*args, **kwargs)):
      if i == checkpoint + 1:
        deadline = time.time() + 60
        while not (workdir / 'checkpoints' / str(checkpoint)).is_dir() and time.time() < deadline:
          time.sleep(0.1)
        raise KeyboardInterrupt('simulated kill')
      yield batch

  monkeypatch.setattr(batching, 'train_batches', crashing_batches)
  with pytest.raises(KeyboardInterrupt):
    pretrain.train_and_evaluate(config, str(workdir))
  monkeypatch.setattr(batching, 'train_batches', real_batches)
  return pretrain.train_and_evaluate(config, str(workdir))


# --------------------------------------------------------------------------
# Run outputs.


def read_jsonl(path) -> list:
  """The rows of a .jsonl file (metrics.jsonl), in order."""
  with open(path) as f:
    return [json.loads(line) for line in f]


def assert_same_state(a, b):
  """Two train states (or any pytrees) with the same structure and bit-identical leaves."""
  a, b = jax.device_get(a), jax.device_get(b)
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------
# Random image ops from a key (the library's take uniforms).


def crop_box(key, height: int, width: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """A RandomResizedCrop box (top, left, h, w), float32 [4] of integers, from `key`."""
  u = jax.random.uniform(key, (image_ops.CROP_UNIFORMS,))
  return image_ops.crop_box_from_uniforms(u, height, width, scale, ratio)


def jitter_factors(key, strength):
  """ColorJitter factors [b, c, s, h] for strengths (b, c, s, h), from `key`."""
  return image_ops.jitter_factors_from_uniforms(jax.random.uniform(key, (4,)), strength)
