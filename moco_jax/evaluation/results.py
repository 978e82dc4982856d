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

from moco_jax.core import files
from moco_jax.run import metrics_writer

RESULTS_FILE = 'eval.json'


def write_results(workdir: str, results: dict) -> dict:
  """Merges `results` into WORKDIR/eval.json (atomically, process 0 only); returns all."""
  path = os.path.join(workdir, RESULTS_FILE)
  merged = read_results(workdir)
  merged.update({k: metrics_writer.json_value(v) for k, v in results.items()})
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    files.atomic_write(path, lambda f: json.dump(merged, f, indent=2, sort_keys=True))
    logging.info('Wrote %s to %s.', sorted(results), path)
  return merged


def read_results(workdir: str) -> dict:
  """WORKDIR/eval.json as a dict ({} when absent)."""
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)
