"""The paper protocol's long-job state on disk: Orbax checkpoints and the per-epoch curve.

WORKDIR/linear_paper/ (random_init_linear_paper/ for the floor) holds
checkpoints/ (the classifier, its momentum buffer, the step and the epoch's
running sums), checksums.json (each kept checkpoint's content sha256, checked
before it is restored), metrics.jsonl (one row per epoch, rewritten whole so that a
resume drops the rows after the restored epoch) and curves.png.
"""

import json
import os

from absl import logging
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from moco_jax.core import errors
from moco_jax.core import files
from moco_jax.run import checkpoints

RESULT_DIR = 'linear_paper'


def result_dir(workdir: str, prefix: str) -> str:
  """WORKDIR/linear_paper (WORKDIR/random_init_linear_paper for the floor), absolute."""
  return os.path.abspath(os.path.join(workdir, prefix + RESULT_DIR))


def manager(directory: str) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=2, create=True, cleanup_tmp_directories=True,
      async_options=ocp.options.AsyncOptions(create_directories_asynchronously=False))
  return ocp.CheckpointManager(os.path.join(directory, 'checkpoints'), options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


PROTOCOL = 'protocol.json'


def check_protocol(directory: str, fields: dict, has_checkpoint: bool):
  """Refuses to resume a classifier trained under other protocol values (CheckpointError).

  DIRECTORY/protocol.json records the values that define the result (epochs,
  batch, lr, its steps, decay, crops, seed, the backbone's step and weights,
  the train split); a rerun that changes any of them would mix two protocols
  in one classifier and report values it was not computed with.
  """
  path = os.path.join(directory, PROTOCOL)
  if not has_checkpoint or not os.path.exists(path):
    return
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise errors.CheckpointError(f'{path} is unreadable ({e}): delete {directory} to start the '
                                 'protocol over.') from e
  diffs = [f'{k}: {saved.get(k)!r} -> {v!r}' for k, v in fields.items()
           if k in saved and saved[k] != v]
  if diffs:
    raise errors.CheckpointError(
        f'The paper linear protocol in {directory} was trained with other values '
        f'({"; ".join(diffs)}): its classifier and curve would mix two protocols. Restore '
        f'those values, or delete {directory} to run the protocol over with the new ones.')


def record_protocol(directory: str, fields: dict):
  files.atomic_write(os.path.join(directory, PROTOCOL),
                     lambda f: json.dump(fields, f, indent=2, sort_keys=True))


CHECKSUMS = 'checksums.json'


def _checksums_path(manager: ocp.CheckpointManager) -> str:
  return os.path.join(os.path.dirname(str(manager.directory)), CHECKSUMS)


def _read_checksums(manager: ocp.CheckpointManager) -> dict:
  try:
    with open(_checksums_path(manager)) as f:
      sums = json.load(f)
    return sums if isinstance(sums, dict) else {}
  except (OSError, ValueError):
    return {}


def _step_sha256(manager: ocp.CheckpointManager, step: int) -> str:
  return files.tree_sha256(os.path.join(str(manager.directory), str(step)))


def _verified_steps(manager: ocp.CheckpointManager) -> list:
  """The saved steps whose content matches its recorded sha256, newest first.

  A step that does not (changed or truncated files, or no checksum recorded)
  is moved aside to DIRECTORY/checkpoints_corrupt/ with one warning, never
  restored; the protocol then resumes from the newest step that matches, or
  starts over.
  """
  sums = _read_checksums(manager)
  steps = sorted(manager.all_steps(), reverse=True)
  good = [step for step in steps if sums.get(str(step)) == _step_sha256(manager, step)]
  if jax.process_count() > 1:  # Every process has read the files before process 0 moves any.
    multihost_utils.sync_global_devices('linear_paper_checksums')
  for step in steps:
    if step in good:
      continue
    why = 'its content changed' if str(step) in sums else 'no checksum was recorded for it'
    moved = checkpoints.move_aside(manager, step)
    logging.warning('The linear-protocol checkpoint at step %d in %s is not used: %s since it '
                    'was saved. Moved it to %s (nothing deleted); the protocol resumes from an '
                    'earlier checkpoint or starts over.', step, manager.directory, why, moved)
  return good


def restore(manager: ocp.CheckpointManager, state: dict) -> dict:
  """The latest saved state whose content is verified (or `state` when there is none); refuses
  another backbone's."""
  verified = _verified_steps(manager)
  if not verified:
    return state
  step = verified[0]
  try:
    restored = checkpoints.restore(manager, step, jax.device_get(state))
  except Exception as e:  # pylint: disable=broad-except
    raise errors.CheckpointError(
        f'The linear-protocol checkpoint at step {step} in {manager.directory} does not restore '
        f'into this run ({type(e).__name__}: {str(e)[:200]}): another model or dataset wrote '
        'it. Delete that directory to start the protocol over.') from e
  if int(restored['backbone_step']) != int(state['backbone_step']):
    raise errors.CheckpointError(
        f'{manager.directory} holds a classifier trained on the backbone of pretraining step '
        f'{int(restored["backbone_step"])}, but the latest checkpoint is step '
        f'{int(state["backbone_step"])}: delete that directory to evaluate the new one.')
  return restored


def save(manager: ocp.CheckpointManager, state: dict):
  """Saves `state` and records its content sha256 (process 0) for the next restore's check."""
  step = int(state['step'])
  manager.save(step, args=ocp.args.StandardSave(jax.device_get(state)), force=True)
  manager.wait_until_finished()
  if jax.process_index() == 0:
    kept = {str(s) for s in manager.all_steps()}
    sums = {k: v for k, v in _read_checksums(manager).items() if k in kept}
    sums[str(step)] = _step_sha256(manager, step)
    files.atomic_write(_checksums_path(manager),
                       lambda f: json.dump(sums, f, indent=2, sort_keys=True))


def read_curve(directory: str) -> list:
  """The rows of DIRECTORY/metrics.jsonl ([] when absent)."""
  path = os.path.join(directory, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def write_curve(directory: str, rows: list):
  """metrics.jsonl (rewritten whole: a resume drops rows after the restored epoch) + curves.png."""
  files.atomic_write(os.path.join(directory, 'metrics.jsonl'),
                     lambda f: f.writelines(json.dumps(row) + '\n' for row in rows))
  try:
    plot_curve(rows, os.path.join(directory, 'curves.png'))
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('Could not draw %s/curves.png (%s); metrics.jsonl has the curve.', directory,
                    e)


def plot_curve(rows: list, path: str):
  """Train loss (left), train and val top-1 (right) against epoch."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(9, 3.5), dpi=100, layout='constrained')
  loss_ax, acc_ax = fig.subplots(1, 2)
  epochs = [r['epoch'] for r in rows]
  loss_ax.plot(epochs, [r['train_loss'] for r in rows], marker='o', markersize=3)
  loss_ax.set(xlabel='epoch', title='train loss (augmented views)')
  acc_ax.plot(epochs, [r['train_top1'] for r in rows], marker='o', markersize=3, label='train')
  acc_ax.plot(epochs, [r['val_top1'] for r in rows], marker='o', markersize=3, label='val')
  acc_ax.set(xlabel='epoch', title='top-1 (%)')
  acc_ax.legend()
  for ax in (loss_ax, acc_ax):
    ax.grid(True, alpha=0.3)
  fig.savefig(path)
