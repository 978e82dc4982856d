"""WORKDIR/eval.json: every evaluation's figures, merged side by side.

kNN, linear and random-init rows written by separate runs live in one file:

  knn_top1, knn_step                        kNN on the latest checkpoint
  linear_top1, linear_top5, linear_step     linear probe on it
  random_init_knn_top1, random_init_...     the same on the step-0 encoder

Accuracies are percentages (0-100); *_step is the checkpoint's train step
(0 for random init).
"""

import json
import os

from absl import logging
import jax

from moco_jax.core import errors
from moco_jax.core import files
from moco_jax.run import metrics_writer

RESULTS_FILE = 'eval.json'


def write_results(workdir: str, results: dict) -> dict:
  """Merges `results` into WORKDIR/eval.json (atomically, process 0 only); returns all."""
  path = os.path.join(workdir, RESULTS_FILE)
  merged = read_results(workdir)
  merged.update({k: metrics_writer.json_value(v) for k, v in results.items()})
  if jax.process_index() == 0:
    files.make_dir(workdir, 'eval.json')
    files.atomic_write(path, lambda f: json.dump(merged, f, indent=2, sort_keys=True))
    logging.info('Wrote %s to %s.', sorted(results), path)
  return merged


def read_results(workdir: str) -> dict:
  """WORKDIR/eval.json as a dict ({} when absent)."""
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.lexists(path):
    return {}
  if os.path.isdir(path) or not os.path.exists(path):  # A directory, or a dangling link.
    files.check_file(path, 'the evaluation results')
  with open(path) as f:
    try:
      values = json.load(f)
    except json.JSONDecodeError as e:
      raise errors.CheckpointError(
          f'{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}): it holds the '
          'earlier evaluations\' figures, merged with each new one. Fix that line, or move the '
          'file aside and rerun.') from e
  if not isinstance(values, dict):
    raise errors.CheckpointError(f'{path} holds a {type(values).__name__}, not a JSON object '
                                 'of figures: move it aside and rerun.')
  return values


def check_before_evaluation(workdir: str, mode: str):
  """Finds what would fail at the end of an evaluation before its work starts.

  A broken eval.json (merged into at the end) and a workdir the results cannot
  be written to used to end in a traceback after the whole evaluation had run.
  """
  read_results(workdir)
  directory = os.path.abspath(workdir)
  if not os.path.isdir(directory):
    return  # Nothing to evaluate there: the mode says so (no checkpoint, no config).
  try:
    files.check_file(os.path.join(directory, RESULTS_FILE), 'the evaluation results')
  except errors.OutputError as e:
    raise errors.CheckpointError(f'{e} --mode={mode} writes its results there.') from e
