"""The device mesh and moving arrays onto it and back, for one host or many.

Every jit-compiled program of moco_jax runs over a one-axis mesh named
`'data'`: the state replicated (`P()`), batches split (`P('data')`). The
helpers here build global arrays from each process's own slice and bring
results back to every host, so the same code runs on one GPU, a node and a
pod.
"""

import jax
import jax.numpy as jnp
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


def pmean_packed(tree, axis_name: str = AXIS):
  """`jax.lax.pmean(tree, axis_name)` as one all-reduce per dtype (call under shard_map).

  `lax.pmean` of a pytree is one all-reduce per leaf. Across processes on CPU
  (gloo over TCP) each all-reduce costs a round trip whatever its size: the
  ~80 gradients and BatchNorm statistics of even a tiny ResNet then cost
  several times the step's compute (docs/benchmarks.md, "Two processes
  against one"). Here the leaves of each dtype are raveled into one
  vector, reduced once and split back: the same sums, element by element.
  GPUs and TPUs already combine small all-reduces (XLA's combiner pass); the
  concatenation costs them one copy of the tree.
  """
  leaves, treedef = jax.tree.flatten(tree)
  by_dtype = {}
  for i, leaf in enumerate(leaves):
    by_dtype.setdefault(jnp.result_type(leaf), []).append(i)
  out = list(leaves)
  for indices in by_dtype.values():
    flat = jax.lax.pmean(jnp.concatenate([jnp.ravel(leaves[i]) for i in indices]), axis_name)
    offset = 0
    for i in indices:
      size = int(np.prod(np.shape(leaves[i])))
      out[i] = flat[offset:offset + size].reshape(np.shape(leaves[i]))
      offset += size
  return jax.tree.unflatten(treedef, out)
