"""docs/architecture.md's "Adding a method" example, run as written: a new method trains.

The code block is read from the document (not copied here), registered under
its name, and pretrained for a few steps through the same loop as every method,
then evaluated by kNN: if the document drifts from the seam, this fails.
"""

import os
import re
import types

import jax
import ml_collections
import numpy as np

from configs import tiny
from moco_jax import pretrain
from moco_jax.evaluation import knn
from moco_jax.methods import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example_module() -> types.ModuleType:
  text = open(os.path.join(ROOT, 'docs', 'architecture.md')).read()
  section = text[text.index('## Adding a method'):]
  code = re.search(r'```python\n(.*?)```', section, re.S).group(1)
  module = types.ModuleType('in_batch_example')
  exec(compile(code, 'docs/architecture.md', 'exec'), module.__dict__)  # pylint: disable=exec-used
  return module


def test_the_documented_method_trains_through_the_seam(tmp_path, monkeypatch):
  example = _example_module()
  monkeypatch.setitem(registry.METHODS, example.InBatch.name, example.InBatch)
  config = tiny.get_config()
  config.method = 'in_batch'
  config.in_batch = ml_collections.ConfigDict({'temperature': 0.2})
  config.num_epochs, config.num_train_steps = 1, 3
  config.data.synthetic_examples = 192
  state = pretrain.train_and_evaluate(config, str(tmp_path))
  assert int(jax.device_get(state.step)) == 3
  rows = [line for line in open(tmp_path / 'metrics.jsonl')]
  assert rows and all('nan' not in r.lower() for r in rows)
  # The method's config check is reached through the registry.
  config.in_batch.temperature = 0.0
  try:
    registry.check_config(config, 1)
  except Exception as e:  # pylint: disable=broad-except
    assert 'in_batch.temperature' in str(e)
  else:
    raise AssertionError('the documented check did not refuse temperature 0')
  # Every evaluation sees the trained backbone: kNN runs on it.
  config.in_batch.temperature = 0.2
  scores = knn.run_knn(config, str(tmp_path))
  assert np.isfinite(scores['knn_top1']) and scores['knn_step'] == 3
