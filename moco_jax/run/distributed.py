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

import errno
import hashlib
import json
import os
import socket
import threading
import time
from typing import Optional

from absl import logging
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moco_jax.core import errors

# jax.distributed's own start-up timeout, beyond ours: its expiry is a C++
# abort ("another task died", rc -6), so our watchdog must always come first.
_JAX_TIMEOUT_BACKSTOP_S = 60


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
  check_cluster_flags(coordinator_address, num_processes, process_id)
  watchdog = _start_watchdog(coordinator_address, num_processes, process_id,
                             initialization_timeout)
  try:
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=initialization_timeout + _JAX_TIMEOUT_BACKSTOP_S,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  finally:
    watchdog.set()
  warm_up_collectives(initialization_timeout)
  logging.info('jax.distributed: process %d of %d (coordinator %s); a process silent for %d s '
               'is declared dead and the others exit.', jax.process_index(),
               jax.process_count(), coordinator_address or 'auto-detected',
               heartbeat_timeout_seconds)


def check_cluster_flags(coordinator_address: Optional[str], num_processes: Optional[int],
                        process_id: Optional[int]):
  """Refuses, naming the flag, a cluster start that cannot work; before jax.distributed runs.

  jax.distributed reports these as a traceback (an id out of range), a
  segmentation fault (process 0's port already in use) or, after the whole
  timeout, a C++ abort.
  """
  if num_processes is not None and num_processes < 1:
    raise errors.DistributedError(f'--num_processes={num_processes} must be >= 1.')
  if process_id is not None:
    if process_id < 0 or (num_processes is not None and process_id >= num_processes):
      top = f'0..{num_processes - 1}' if num_processes else '>= 0'
      raise errors.DistributedError(
          f'--process_id={process_id} is out of range for --num_processes={num_processes}: '
          f'give each process an id in {top}, process 0 on the --coordinator_address host.')
  if coordinator_address is None:
    return
  host, _, port = coordinator_address.rpartition(':')
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise errors.DistributedError(
        f'--coordinator_address={coordinator_address!r} is not host:port (e.g. '
        '10.0.0.1:12355, a free port on the host of process 0).')
  if process_id == 0:
    _check_port_free(coordinator_address, int(port))


def _check_port_free(coordinator_address: str, port: int):
  """Process 0 serves the coordination service on `port` of this host: it must be free."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
    try:
      probe.bind(('', port))
    except OSError as e:
      if e.errno != errno.EADDRINUSE:
        return  # Not ours to judge (e.g. a privileged port): jax.distributed will say.
      raise errors.DistributedError(
          f'--coordinator_address={coordinator_address}: port {port} is already in use on this '
          'host (another run\'s coordinator?). Process 0 serves the coordination service there: '
          'pick a free port for every process, or stop the other run.') from e


def _reachable(coordinator_address: str, timeout_s: float = 2.0) -> bool:
  host, _, port = coordinator_address.rpartition(':')
  try:
    with socket.create_connection((host.strip('[]'), int(port)), timeout=timeout_s):
      return True
  except (OSError, ValueError):
    return False


def _start_watchdog(coordinator_address, num_processes, process_id,
                    timeout_s: int) -> threading.Event:
  """Ends the process with one line if the cluster has not formed within `timeout_s`.

  jax.distributed releases the GIL while it waits, so this thread runs; it
  fires before jax's own (longer) timeout, whose expiry is a C++ abort.
  Returns the event that disarms it.
  """
  done = threading.Event()

  def watch():
    if done.wait(timeout_s):
      return
    flags = (f'--coordinator_address={coordinator_address} --num_processes={num_processes} '
             f'--process_id={process_id}')
    if process_id not in (None, 0) and coordinator_address and not _reachable(coordinator_address):
      message = (f'nothing answers at --coordinator_address={coordinator_address} after '
                 f'{timeout_s} s ({flags}): start process 0 there first, and check the host, '
                 'the port and the firewall.')
    else:
      message = (f'the cluster did not form within --initialization_timeout={timeout_s} s '
                 f'({flags}): not every process connected. Start all {num_processes or "N"} '
                 'processes (ids 0..N-1, the same --coordinator_address and --num_processes), or '
                 'raise --initialization_timeout.')
    errors.exit_with_message('distributed', message)

  threading.Thread(target=watch, name='moco-jax-distributed-watchdog', daemon=True).start()
  return done


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


_COORDINATOR_LINGER_S = 3.0  # Time for the other processes to print their line and exit.
_AGREEMENTS = {}  # name -> how many times it was checked in this process (unique keys).


def _digest(value) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def disagreements(published: dict) -> list:
  """[(process, [fields])] of the processes whose digests differ from process 0's."""
  first = published[0]
  out = []
  for process in sorted(published)[1:]:
    theirs = published[process]
    fields = sorted(k for k in set(first) | set(theirs) if first.get(k) != theirs.get(k))
    if fields:
      out.append((process, fields))
  return out


def check_agreement(name: str, values: dict, timeout_seconds: int = 300):
  """Every process must compute on the same config, data and checkpoint (DistributedError).

  Each process publishes a digest of each of `values` ({field: value}, e.g.
  the flattened config, the data's identity, the checkpoint step) in the
  coordination service's key-value store and reads every other process's:
  all of them see the same differences and stop within seconds, naming the
  fields and the processes, before the first step or evaluation (a mismatch
  otherwise surfaces minutes later as a Gloo abort, or never: a silent mix).
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = jax_distributed.global_state.client
  count = _AGREEMENTS[name] = _AGREEMENTS.get(name, 0) + 1
  prefix = f'moco_jax_agree/{name}/{count}'
  mine = {k: _digest(v) for k, v in values.items()}
  client.key_value_set(f'{prefix}/{jax.process_index()}', json.dumps(mine))
  published = {p: json.loads(client.blocking_key_value_get(f'{prefix}/{p}',
                                                           int(timeout_seconds * 1000)))
               for p in range(jax.process_count())}
  found = disagreements(published)
  if found:
    # Every process has read every digest: all of them end now, each with its own line. Process
    # 0 runs the coordination service, and its exit aborts the others' C++ client at once
    # (rc -6, no message), so it leaves last.
    client.wait_at_barrier(f'{prefix}/read', int(timeout_seconds * 1000))
    if jax.process_index() == 0:
      time.sleep(_COORDINATOR_LINGER_S)
    which = '; '.join(f'process {p}: {", ".join(fields[:8])}'
                      + (f' and {len(fields) - 8} more' if len(fields) > 8 else '')
                      for p, fields in found)
    raise errors.DistributedError(
        f'The processes of this job disagree with process 0 before {name} ({which}): every '
        'process must be started with the same command, config overrides, data and WORKDIR. '
        'Fix the differing process(es) and rerun all of them.')


def config_values(config) -> dict:
  """{'config.a.b': value} of every leaf: what check_agreement compares, field by field."""
  out = {}

  def walk(tree, prefix):
    for key, value in tree.items():
      if isinstance(value, dict):
        walk(value, f'{prefix}{key}.')
      else:
        out[f'{prefix}{key}'] = value
  walk(config.to_dict(), 'config.')
  return out
