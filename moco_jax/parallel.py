"""The device mesh and moving arrays onto it and back, for one host or many.

Every jit-compiled program of moco_jax runs over a one-axis mesh named
`'data'`: the state replicated (`P()`), batches split (`P('data')`). The
helpers here build global arrays from each process's own slice and bring
results back to every host, so the same code runs on one GPU, a node and a
pod.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = 'data'


def make_mesh(devices=None) -> Mesh:
  """A one-axis ('data',) mesh over all (global) devices."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (AXIS,))


def replicate(tree, mesh: Mesh):
  """Places a host pytree on every device of `mesh` (works across hosts)."""
  sharding = NamedSharding(mesh, P())
  return jax.tree.map(lambda x: jax.make_array_from_callback(
      np.shape(x), sharding, lambda idx: np.asarray(x)[idx]), jax.device_get(tree))


def shard_batch(local_batch: np.ndarray, mesh: Mesh) -> jax.Array:
  """A global array split on 'data' from this process's slice of the batch."""
  sharding = NamedSharding(mesh, P(AXIS))
  return jax.make_array_from_process_local_data(sharding, local_batch)


def host_gather(array) -> np.ndarray:
  """A global (possibly multi-host) array, or a per-process NumPy slice, as one host array.

  With one process this is `np.asarray`; with several, every process gets the
  concatenation of all processes' slices in process order.
  """
  if jax.process_count() == 1:
    return np.asarray(array)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))
