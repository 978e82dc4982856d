"""Progress lines and plottable metrics: WORKDIR/metrics.jsonl (+ TensorBoard).

metrics.jsonl holds one JSON object per logged step, so `pandas.read_json(...,
lines=True)` plots a run; TensorBoard events are written too when tensorboardX
is importable (no TensorFlow needed, so the GPU machines can have them).
"""

import contextlib
import json
import os
import time

from absl import logging
import numpy as np

from moco_jax.core import files


def average(rows):
  """Mean of each metric over a list of per-step metric dicts."""
  return {k: float(np.mean([np.asarray(r[k]) for r in rows])) for k in rows[0]}


class Progress:
  """Throughput and ETA over training steps only, and when to print a line.

  Time spent in `paused()` blocks (the kNN monitor, checkpoint saves) is left
  out of img/s and of the ETA, so an interval holding a 60 s monitor does not
  read as a slow one. `due()` says when `heartbeat_sec` of wall time passed
  since the last line, so something is printed every ~30 s whatever
  `log_every_steps` is.
  """

  def __init__(self, total_steps: int, start_step: int, global_batch: int, steps_per_epoch: int,
               heartbeat_sec: float = 30.0, clock=time.perf_counter):
    self.total_steps = total_steps
    self.global_batch = global_batch
    self.steps_per_epoch = max(steps_per_epoch, 1)
    self.heartbeat_sec = heartbeat_sec
    self._clock = clock
    self._last_step = start_step
    self._last_time = clock()
    self._paused = 0.0  # Seconds paused since _last_time.
    self._last_line = self._last_time
    self._timed_steps = 0
    self._timed_sec = 0.0
    self._estimated = False

  def elapsed(self) -> float:
    return self._clock() - self._last_time

  def restart(self, step: int):
    """Measures from now and `step` on (e.g. after compilation)."""
    self._last_step, self._last_time, self._paused = step, self._clock(), 0.0

  @contextlib.contextmanager
  def paused(self):
    """Leaves the time of the block out of the training time."""
    start = self._clock()
    try:
      yield
    finally:
      self._paused += self._clock() - start

  def due(self) -> bool:
    """True when no line was printed for `heartbeat_sec` seconds."""
    return self._clock() - self._last_line >= self.heartbeat_sec

  def peek(self, step: int) -> dict:
    """Rates since the last `update`, without starting a new interval."""
    self._last_line = self._clock()
    steps = step - self._last_step
    seconds = max(self._last_line - self._last_time - self._paused, 1e-9)
    row = {'epoch': step / self.steps_per_epoch}
    if steps <= 0:  # Nothing timed yet (e.g. the compiling first step): no rate to report.
      return row
    steps_per_sec = steps / seconds
    row.update(steps_per_sec=steps_per_sec, images_per_sec=steps_per_sec * self.global_batch,
               eta_sec=(self.total_steps - step) / max(steps_per_sec, 1e-9))
    self._maybe_log_estimate(step, steps, seconds)
    return row

  def update(self, step: int) -> dict:
    """Rates over the training time since the last update; starts a new interval."""
    row = self.peek(step)
    if step > self._last_step:
      self._timed_steps += step - self._last_step
      self._timed_sec += max(self._last_line - self._last_time - self._paused, 0.0)
      self._last_step, self._last_time, self._paused = step, self._last_line, 0.0
    return row

  def _maybe_log_estimate(self, step: int, steps: int, seconds: float):
    """Logs the estimated training time once, when the first timed steps are in."""
    if self._estimated or (steps < 20 and seconds < 10):  # Too few to say much yet.
      return
    self._estimated = True
    rate = steps / seconds
    eta = format_duration((self.total_steps - step) / max(rate, 1e-9))
    logging.info('Estimated time to step %d: %s of training at %.1f img/s (measured over %d '
                 'steps; kNN monitors and checkpoints come on top).', self.total_steps, eta,
                 rate * self.global_batch, steps)


def format_duration(seconds: float) -> str:
  """'1:02:03' (h:mm:ss)."""
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


class MetricsWriter:
  """Writes a metrics.jsonl row (+ TB scalars) per call."""

  def __init__(self, workdir: str, config=None, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.workdir = workdir
    self._tb = None
    if not enabled:
      return
    files.make_dir(workdir, 'metrics')
    if config is not None:
      tensorboard = tensorboard and config.get('tensorboard', True)
    if tensorboard:
      self._tb = _maybe_tensorboard(workdir)

  def write(self, step: int, scalars: dict, quiet: bool = False):
    if not self.enabled:
      return
    row = {'step': int(step), **{k: json_value(v) for k, v in scalars.items()}}
    with open(os.path.join(self.workdir, 'metrics.jsonl'), 'a') as f:
      f.write(json.dumps(row) + '\n')
    if self._tb is not None:
      self._tb(step, row)
    if not quiet:
      logging.info('%s', format_progress(row))

  def log_only(self, step: int, scalars: dict):
    """The progress line of `scalars`, logged but not recorded (a wall-time heartbeat)."""
    if self.enabled:
      row = {'step': int(step), **{k: json_value(v) for k, v in scalars.items()}}
      logging.info('%s', format_progress(row))

  def drop_rows_after(self, step: int):
    """Drops metrics.jsonl rows past `step` (the resumed checkpoint's), atomically.

    A run killed after logging step s but before its checkpoint at s' < s logs
    steps s'+1..s again when resumed: without this they would appear twice.
    """
    path = os.path.join(self.workdir, 'metrics.jsonl')
    if not self.enabled or not os.path.exists(path):
      return
    with open(path) as f:
      lines = f.readlines()
    kept = []
    for line in lines:
      try:
        keep = int(json.loads(line)['step']) <= step
      except (ValueError, KeyError, TypeError):
        keep = False  # A half-written last line of a killed run.
      if keep:
        kept.append(line if line.endswith('\n') else line + '\n')
    if len(kept) != len(lines):
      files.atomic_write(path, lambda f: f.writelines(kept))
      logging.info('Dropped %d metrics.jsonl rows after the resumed step %d.',
                   len(lines) - len(kept), step)

  def close(self):
    self._tb = None


def format_progress(row: dict) -> str:
  """'step 100 | epoch 2.7 | loss 7.1234 | 1234 img/s | ETA 0:12:34' style line."""
  parts = [f"step {row['step']}"]
  if 'epoch' in row:
    parts.append(f"epoch {row['epoch']:.2f}")
  for key in ('train_loss', 'contrastive_acc', 'learning_rate', 'knn_top1'):
    if key in row:
      parts.append(f'{key} {row[key]:.4g}')
  if 'images_per_sec' in row:
    parts.append(f"{row['images_per_sec']:.1f} img/s")
  if 'eta_sec' in row:
    parts.append(f"ETA {format_duration(row['eta_sec'])}")
  return ' | '.join(parts)


def json_value(value):
  """A scalar or array as a plain Python number or list, for json.dumps."""
  value = np.asarray(value)
  return value.item() if value.size == 1 else value.tolist()


def _maybe_tensorboard(workdir: str):
  """A scalar writer from tensorboardX (no TensorFlow needed), or None."""
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  writer = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(step, row):
    for key, value in row.items():
      if key != 'step' and isinstance(value, (int, float)):
        writer.add_scalar(key, value, int(step))
    writer.flush()

  return write
