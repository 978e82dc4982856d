"""Frozen-backbone features: the one place every evaluation gets its inputs from.

`load_backbone` gives the QUERY encoder's backbone (params + BatchNorm running
statistics, no head) of the latest checkpoint of a workdir (or, when it has
none, of the official checkpoint `config.init_from`), or the randomly
initialised encoder the pretraining started from (`config.eval.random_init`,
the floor every result is compared with). `extract_features` runs it in
inference mode on the deterministic eval view of every image of a split,
data-parallel over the mesh. kNN, the linear probe and the report use these.
"""

import functools
from typing import Callable, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moco_jax import models
from moco_jax.augmentation import augment
from moco_jax.core import parallel
from moco_jax.data import batching
from moco_jax.data.dataset import ImageDataset
from moco_jax.evaluation import official_weights
from moco_jax.methods import contrastive
from moco_jax.methods import registry
from moco_jax.run import checkpoints
from moco_jax.training import state as state_lib


def eval_batch_size(requested: int, num_devices: int) -> int:
  """`requested` rounded up to a multiple of the device count (each gets a slice)."""
  return max(1, -(-requested // num_devices)) * num_devices


class _NormConfig(NamedTuple):
  """The two fields of config.aug that `augment.eval_view` reads, hashable for the cache."""
  mean: tuple
  std: tuple


@functools.lru_cache(maxsize=8)
def _feature_fn(backbone, image_size: int, mean: tuple, std: tuple, dtype: str, mesh: Mesh,
                normalize: bool) -> Callable:
  """jit(shard_map(features)) of one batch; cached so each shape compiles once per run.

  Variables are replicated, uint8 images split on 'data'; each device runs the
  deterministic eval view and the backbone on its slice, so extraction is
  data-parallel with no collective at all.
  """
  aug = _NormConfig(mean, std)

  def features(variables, images):
    x = augment.eval_view(images, image_size, aug, jnp.dtype(dtype))
    f = backbone.apply(variables, x, train=False)
    return contrastive.l2_normalize(f) if normalize else f

  sharded = jax.shard_map(features, mesh=mesh, in_specs=(P(), P(parallel.AXIS)),
                          out_specs=P(parallel.AXIS),
                          check_vma=False)
  return jax.jit(sharded)


def feature_fn(config, backbone, mesh: Mesh, normalize: bool) -> Callable:
  """The compiled batch -> features function of `config` (cached per shape)."""
  return _feature_fn(backbone, config.data.image_size, tuple(config.aug.mean),
                     tuple(config.aug.std), config.model.dtype, mesh, normalize)


def backbone_variables(params, batch_stats) -> dict:
  """The backbone's variables out of an encoder's (query) params and batch stats."""
  return {'params': params['backbone'], 'batch_stats': batch_stats.get('backbone', {})}


def extract_features(config, backbone, variables, ds: ImageDataset, mesh: Mesh,
                     normalize: bool = True) -> np.ndarray:
  """Backbone features [N, C] float32 of every image of `ds`, in dataset order.

  Args:
    config: the full config (reads data.image_size, aug.mean/std, model.dtype,
      eval.batch_size).
    backbone: a `models.ResNet` (inference mode is chosen here).
    variables: {'params', 'batch_stats'} of the backbone, replicated on `mesh`
      or host arrays.
    ds: the split to encode.
    mesh: the one-axis ('data',) mesh.
    normalize: L2-normalise each feature (kNN) or not (linear probe).
  """
  batch = eval_batch_size(config.eval.batch_size, mesh.size)
  fn = feature_fn(config, backbone, mesh, normalize)
  replicated = NamedSharding(mesh, P())
  variables = jax.device_put(variables, replicated)
  data_sharding = NamedSharding(mesh, P(parallel.AXIS))
  chunks = []
  for b in batching.eval_batches(ds, global_batch=batch, process_index=jax.process_index(),
                                       process_count=jax.process_count()):
    images = jax.make_array_from_process_local_data(data_sharding, b['image'])
    out = fn(variables, images)
    # The last batch is padded; the mask keeps the real rows.
    chunks.append((parallel.host_gather(out), b['mask']))
  rows = [f[parallel.host_gather(m)] for f, m in chunks]
  features = np.concatenate(rows, axis=0).astype(np.float32)
  if features.shape[0] != len(ds):
    raise AssertionError(f'extracted {features.shape[0]} features for {len(ds)} images')
  return features


def random_init_encoder(config):
  """(params, batch_stats) of the step-0 trained encoder: the untrained floor.

  `state.initial_encoder_variables`, which `state.create_train_state` uses
  too: exactly the weights pretraining starts from with this config.seed.
  """
  encoder = registry.create(config, num_devices=1).encoder
  return state_lib.initial_encoder_variables(jax.random.PRNGKey(config.seed), encoder,
                                             config.data.image_size,
                                             int(config.data.get('channels', 3)))


def query_encoder(config, workdir: str):
  """(params, batch_stats, step) of the query encoder to evaluate or export.

  The latest checkpoint of WORKDIR; with none there and config.init_from set,
  the official checkpoint's query backbone (step 0: no step of ours).
  """
  path = config.get('init_from', '')
  if path and not checkpoints.checkpoint_steps(workdir):
    logging.info('No checkpoint in %s: using the query encoder of config.init_from=%s.',
                 checkpoints.checkpoint_dir(workdir), path)
    return (*official_weights.query_encoder(path, config), 0)
  if path:
    logging.info('Evaluating the checkpoint in %s, not config.init_from=%s (which only seeds a '
                 'new run, or is evaluated while WORKDIR has no checkpoint).',
                 checkpoints.checkpoint_dir(workdir), path)
  return checkpoints.restore_query_encoder(workdir, config.model,
                                           channels=int(config.data.get('channels', 3)))


def load_backbone(config, workdir: str):
  """(backbone module, backbone variables, step, results key prefix) to evaluate.

  With config.eval.random_init the step-0 encoder (step 0, prefix
  'random_init_'); otherwise the latest checkpoint's query encoder (prefix '').
  """
  backbone = models.create_backbone(config.model)
  if config.eval.random_init:
    params, batch_stats = random_init_encoder(config)
    step, prefix = 0, 'random_init_'
  else:
    params, batch_stats, step = query_encoder(config, workdir)
    prefix = ''
  variables = backbone_variables(params, batch_stats)
  return backbone, jax.device_get(variables), step, prefix
