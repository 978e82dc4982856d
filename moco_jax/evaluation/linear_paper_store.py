"""The paper protocol's long-job state on disk: Orbax checkpoints and the per-epoch curve.

WORKDIR/linear_paper/ (random_init_linear_paper/ for the floor) holds
checkpoints/ (the classifier, its momentum buffer, the step and the epoch's
running sums), metrics.jsonl (one row per epoch, rewritten whole so that a
resume drops the rows after the restored epoch) and curves.png.
"""

import json
import os

from absl import logging
import jax
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


def restore(manager: ocp.CheckpointManager, state: dict) -> dict:
  """The latest saved state (or `state` when there is none); refuses another backbone's."""
  step = manager.latest_step()
  if step is None:
    return state
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
  manager.save(int(state['step']), args=ocp.args.StandardSave(jax.device_get(state)),
               force=True)
  manager.wait_until_finished()


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
