"""Many processes: `jax.distributed` start-up for main.py.

One process runs per host (or per GPU); together they see every device of the
job as one mesh. Process 0 also runs the coordination service the others
connect to. Every process reads the whole dataset and takes its slice of each
global batch; process 0 alone writes metrics.jsonl, config.json, TensorBoard
events and eval.json; Orbax writes the checkpoints of all of them into the
same WORKDIR/checkpoints (which must be one shared directory).

If a process dies, the others stop sending it work and, after at most
`heartbeat_timeout_seconds`, the coordination service declares it dead and
every remaining process exits with "The following tasks are unhealthy (stopped
sending heartbeats): <process ids>" (or, when process 0 is the one that died,
"Failed to send RPC to coordination service ... the leader task was
preempted/died"). The rerun resumes from the last checkpoint.
"""

import os
from typing import Optional

from absl import logging
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, heartbeat_timeout_seconds: int = 100,
               initialization_timeout: int = 300):
  """`jax.distributed.initialize`, with CPU collectives through gloo.

  Arguments left None are auto-detected as `jax.distributed` does (SLURM,
  Open MPI, TPU pod metadata, JAX_COORDINATOR_ADDRESS). Must run before
  anything touches a device.
  """
  if 'JAX_CPU_COLLECTIVES_IMPLEMENTATION' not in os.environ:
    # Cross-process all-gathers and all-reduces of CPU devices; gloo is the
    # default from JAX 0.5 on (older versions default to none and then fail
    # at the first collective across processes). GPUs and TPUs ignore it.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=initialization_timeout,
                             heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  warm_up_collectives(initialization_timeout)
  logging.info('jax.distributed: process %d of %d (coordinator %s); a process silent for %d s '
               'is declared dead and the others exit.', jax.process_index(),
               jax.process_count(), coordinator_address or 'auto-detected',
               heartbeat_timeout_seconds)


def barrier(name: str, timeout_seconds: int):
  """Waits until every process reaches `name` (the coordination service, not a collective)."""
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = jax_distributed.global_state.client
  if client is not None and jax.process_count() > 1:
    client.wait_at_barrier(name, timeout_in_ms=int(timeout_seconds * 1000))


def warm_up_collectives(timeout_seconds: int):
  """Opens the cross-process links of the collectives the run uses, all processes in step.

  On CPU, gloo connects the processes of a set of devices at its first
  collective and gives up if they arrive more than 30 s apart (not
  configurable in JAX 0.10: "Gloo context initialization failed:
  GetKeyValue() timed out"); later collectives on the same devices wait as
  long as they need. Processes easily drift that far apart before the first
  train step (dataset loading, compilation with a cold cache on one host and a
  warm one on the other), so this waits at a barrier first and then runs one
  tiny collective on each device set of the run: every device (the train step)
  and the first device of every process (`process_allgather`, Orbax's syncs).
  Cheap on GPUs and TPUs too (a few milliseconds).
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  barrier('moco_jax_warm_up', timeout_seconds)
  mesh = Mesh(np.asarray(jax.devices()), ('all',))
  ones = jax.make_array_from_process_local_data(
      NamedSharding(mesh, P('all')), np.ones(jax.local_device_count(), np.float32))
  total = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x, 'all'), mesh=mesh, in_specs=P('all'),
                                out_specs=P(), check_vma=False))(ones)
  ids = multihost_utils.process_allgather(np.int32(jax.process_index()))
  if float(np.asarray(total.addressable_data(0))[0]) != jax.device_count() or (
      list(np.ravel(ids)) != list(range(jax.process_count()))):
    raise RuntimeError(f'Cross-process collectives are broken: psum of ones over '
                       f'{jax.device_count()} devices gave {total.addressable_data(0)}, process '
                       f'ids gathered {ids}.')
