"""Frozen-backbone features: the one place every evaluation gets its inputs from.

`extract_features` runs a backbone (`moco_jax.evaluation.backbone` says which
weights) in inference mode on the deterministic eval view of every image of a
split, data-parallel over the mesh. kNN, the linear probes and the report use
it; `feature_store` runs the same loop (`encoded_batches`) over a streamed split.
"""

import functools
from typing import Callable, Iterable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moco_jax.augmentation import augment
from moco_jax.core import parallel
from moco_jax.data import batching
from moco_jax.data.dataset import ImageDataset
from moco_jax.methods import contrastive


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


def encoded_batches(config, backbone, variables, mesh: Mesh, batches: Iterable[tuple],
                    normalize: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """The extraction loop: per global batch, (features [n, C] float32, decoded bool [n]).

  Args:
    batches: this process's slice of each global batch, in order, as (uint8
      images [b, S, S, 3], real bool [b]: a row of the split rather than
      padding, decoded bool [b]: the image could be read).
  Yields:
    The features and decoded flags of the batch's real rows, gathered from
    every process. Memory (`extract_features`) and the feature store
    (`feature_store`) both consume this loop.
  """
  fn = feature_fn(config, backbone, mesh, normalize)
  variables = jax.device_put(variables, NamedSharding(mesh, P()))
  data_sharding = NamedSharding(mesh, P(parallel.AXIS))
  for images, real, decoded in batches:
    out = fn(variables, jax.make_array_from_process_local_data(data_sharding, images))
    keep = parallel.host_gather(real)
    good = parallel.host_gather(np.logical_and(decoded, real))
    yield np.asarray(parallel.host_gather(out)[keep], np.float32), good[keep]


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
  # The last batch is padded; its mask marks the real rows (all decoded: ds holds images).
  batches = ((b['image'], b['mask'], b['mask'])
             for b in batching.eval_batches(ds, global_batch=batch,
                                            process_index=jax.process_index(),
                                            process_count=jax.process_count()))
  rows = [f for f, _ in encoded_batches(config, backbone, variables, mesh, batches, normalize)]
  features = np.concatenate(rows, axis=0)
  if features.shape[0] != len(ds):
    raise AssertionError(f'extracted {features.shape[0]} features for {len(ds)} images')
  return features
