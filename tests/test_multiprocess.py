"""Two real processes x 4 CPU devices (jax.distributed over 127.0.0.1, gloo) against one x 8.

One workdir goes through three 2-process runs of `configs/tiny.py`, which
cover the faults and leave a finished run to compare:

  A  SIGKILL process 1 after the step-3 checkpoint, while process 0 waits for
     it in the next step's collectives: process 0 exits within the heartbeat
     timeout, naming the lost process.
  B  Rerun both: it resumes from step 3 and crosses into the second epoch.
     SIGTERM both after step 4 (a preemption): both agree to save step 5 and stop.
  C  Rerun both: it resumes from step 5 and finishes step 6.
  D  --mode=knn on 2 processes.

Then, in this pytest process (1 process x 8 devices, tests/conftest.py), the
uninterrupted reference run: the final checkpoints, the kNN top-1 and an export
of the 2-process checkpoint are compared with it. Every subprocess has a
deadline and is killed if the test fails.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import helpers
import rounding
from moco_jax.core import parallel
from moco_jax.evaluation import export
from moco_jax.evaluation import knn
from moco_jax import pretrain
from moco_jax.run import stopping

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6  # 4 steps an epoch.
EVERY = 3  # checkpoint_every_steps: run A is killed after it, run B signalled a step later.
HEARTBEAT_S = 15  # Short, so that the SIGKILL test is quick; long enough for a loaded CI box.
RUN_TIMEOUT_S = 240


# Both sides run in float64 (tests/rounding.py): 2 processes and 1 then differ by
# float64 rounding alone, a bound that holds on any CPU; at rounding.IMAGE_SIZE.


def _config():
  return helpers.tiny_config(num_train_steps=STEPS, checkpoint_every_steps=EVERY, log_every_steps=1,
                             model__dtype=rounding.DTYPE, data__image_size=rounding.IMAGE_SIZE)


def _flags():
  return [f'--config.num_train_steps={STEPS}', f'--config.checkpoint_every_steps={EVERY}',
          '--config.log_every_steps=1', f'--config.model.dtype={rounding.DTYPE}',
          f'--config.data.image_size={rounding.IMAGE_SIZE}']


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class TwoProcesses:
  """`python tests/multiprocess_main.py` x 2 on 127.0.0.1, 4 CPU devices each.

  `flags`: the --config overrides of both processes (default: this module's
  `_flags()`: STEPS steps of configs/tiny.py); `extra`: more flags after them; `only`: flags
  of process 0 and of process 1 alone.
  """

  def __init__(self, workdir, logdir, name, gate=None, extra=(), flags=None, only=((), ())):
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COORDINATOR_BIND_ADDRESS=f'127.0.0.1:{port}')
    env['XLA_FLAGS'] = helpers.xla_flags()  # Each process has its --cpu_devices.
    env.pop('MOCO_TEST_GATE', None)
    env['JAX_ENABLE_X64'] = '1' if rounding.DTYPE == 'float64' else '0'
    if gate:
      env['MOCO_TEST_GATE'] = gate
    self.logs = [os.path.join(logdir, f'{name}.{i}.log') for i in range(2)]
    self.procs = []
    for i in range(2):
      command = [sys.executable, 'tests/multiprocess_main.py', '--config=configs/tiny.py',
                 f'--workdir={workdir}', '--cpu_devices=4', f'--coordinator_address=127.0.0.1:{port}',
                 '--num_processes=2', f'--process_id={i}',
                 f'--heartbeat_timeout_seconds={HEARTBEAT_S}', '--initialization_timeout=120',
                 *(_flags() if flags is None else flags), *extra, *only[i]]
      with open(self.logs[i], 'w') as log:
        self.procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                           stderr=subprocess.STDOUT))
    self.started = time.time()

  def log(self, i) -> str:
    with open(self.logs[i], errors='replace') as f:
      return f.read()

  def tails(self) -> str:
    return '\n'.join(f'--- process {i} (rc {p.poll()}):\n' + self.log(i)[-3000:]
                     for i, p in enumerate(self.procs))

  def wait(self, i, timeout) -> int:
    try:
      return self.procs[i].wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f'process {i} still running after {timeout:.0f} s:\n{self.tails()}')

  def wait_for(self, condition, what, timeout=RUN_TIMEOUT_S):
    deadline = time.time() + timeout
    while not condition():
      if any(p.poll() is not None for p in self.procs) or time.time() > deadline:
        self.kill()
        pytest.fail(f'waiting for {what}: a process exited or {timeout} s passed:\n'
                    f'{self.tails()}')
      time.sleep(0.05)

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _rows(workdir):
  return helpers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))


@pytest.fixture(scope='module')
def chain(tmp_path_factory):
  """Runs A, B, C (module docstring) in one workdir; returns what the tests check."""
  base = tmp_path_factory.mktemp('multiprocess')
  workdir, out = base / 'run', {'workdir': base / 'run', 'durations': {}}
  ckpt = workdir / 'checkpoints'
  runs = []
  try:
    # A: SIGKILL process 1 once step 3 is checkpointed; process 0 is in step 4's collectives.
    gate = base / 'gate_a'
    gate.mkdir()
    a = TwoProcesses(workdir, base, 'a', gate=f'{EVERY}:{gate}:1')
    runs.append(a)
    a.wait_for(lambda: (gate / 'reached.1').exists() and (ckpt / str(EVERY)).is_dir(),
               f'process 1 at step {EVERY} with its checkpoint')
    time.sleep(1.0)  # Process 0 is now blocked in the next step, waiting for process 1.
    a.procs[1].send_signal(signal.SIGKILL)
    killed = time.time()
    out['a_rc'] = a.wait(0, timeout=HEARTBEAT_S + 60)
    out['a_exit_after_kill_s'] = time.time() - killed
    out['a_log0'] = a.log(0)
    out['a_checkpoints'] = sorted(os.listdir(ckpt))
    out['durations']['a'] = time.time() - a.started

    # B: rerun; SIGTERM both after step 4.
    gate = base / 'gate_b'
    gate.mkdir()
    b = TwoProcesses(workdir, base, 'b', gate=f'{EVERY + 1}:{gate}')
    runs.append(b)
    b.wait_for(lambda: (gate / 'reached.0').exists() and (gate / 'reached.1').exists(),
               f'both processes after step {EVERY + 1}')
    for p in b.procs:
      p.send_signal(signal.SIGTERM)
    # JAX's notifier thread takes the signal up to ~1 s later; the steps of this
    # tiny model are faster, so let the notice land before the processes go on.
    b.wait_for(lambda: all('SIGTERM caught' in b.log(i) for i in range(2)),
               'JAX noticing the SIGTERM', timeout=60)
    time.sleep(1.0)
    (gate / 'open').touch()
    out['b_rc'] = [b.wait(i, timeout=RUN_TIMEOUT_S) for i in range(2)]
    out['b_logs'] = [b.log(0), b.log(1)]
    out['b_checkpoints'] = sorted(os.listdir(ckpt))
    out['durations']['b'] = time.time() - b.started

    # C: rerun to the end.
    c = TwoProcesses(workdir, base, 'c')
    runs.append(c)
    out['c_rc'] = [c.wait(i, timeout=RUN_TIMEOUT_S) for i in range(2)]
    out['c_logs'] = [c.log(0), c.log(1)]
    out['durations']['c'] = time.time() - c.started

    # D: kNN evaluation of the final checkpoint.
    d = TwoProcesses(workdir, base, 'd', extra=['--mode=knn'])
    runs.append(d)
    out['d_rc'] = [d.wait(i, timeout=RUN_TIMEOUT_S) for i in range(2)]
    out['d_logs'] = [d.log(0), d.log(1)]
    out['durations']['d'] = time.time() - d.started
    out['tails'] = '\n'.join(r.tails() for r in runs)
  finally:
    for r in runs:
      r.kill()
  return out


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The uninterrupted run on 1 process x 8 devices, in this process."""
  workdir = tmp_path_factory.mktemp('one_process')
  with rounding.precise(_config()) as config:
    state = pretrain.train_and_evaluate(config, str(workdir))
    return {'workdir': workdir, 'state': jax.device_get(state),
            'knn': knn.run_knn(config, str(workdir))}


def _restore(workdir, step):
  """Checkpoint `step` of `workdir` restored on this process's 8 devices."""
  return jax.device_get(helpers.restore_checkpoint(workdir, _config(), step))


@pytest.mark.slow
def test_sigkill_of_one_process_stops_the_other_naming_it(chain):
  print('2-process runs (s):', {k: round(v, 1) for k, v in chain['durations'].items()},
        f'process 0 exited {chain["a_exit_after_kill_s"]:.1f} s after the SIGKILL')
  log = chain['a_log0']
  assert chain['a_rc'] != 0, log[-3000:]
  assert chain['a_exit_after_kill_s'] < HEARTBEAT_S + 30, chain['a_exit_after_kill_s']
  # The coordination service (in process 0) names the process that stopped.
  assert re.search(r'stopped sending heartbeats\)?:\s*1\b', log), log[-3000:]
  assert str(STEPS) not in chain['a_checkpoints'] and str(EVERY) in chain['a_checkpoints']


@pytest.mark.slow
def test_sigterm_both_saves_the_same_step_and_the_rerun_resumes(chain):
  # A preempted run exits 75 (EX_TEMPFAIL) on every process, so a retry loop reruns it.
  assert chain['b_rc'] == [stopping.EXIT_PREEMPTED] * 2, chain['tails']
  saved = [re.findall(r'SIGTERM: saving step (\d+)', log) for log in chain['b_logs']]
  assert saved[0] == saved[1] and len(saved[0]) == 1, saved
  step = int(saved[0][0])
  assert EVERY + 1 < step < STEPS, step  # After the signal, before the end, not periodic.
  assert str(step) in chain['b_checkpoints']
  assert f'Resuming from step {EVERY}' in chain['b_logs'][0]  # After the SIGKILL of run A.
  assert f'Resuming from step {step}' in chain['c_logs'][0]
  assert chain['c_rc'] == [0, 0], chain['tails']


@pytest.mark.slow
def test_two_processes_give_the_one_process_checkpoint(chain, reference):
  """Equal up to float64 summation order (tests/rounding.py).

  Gradients and BatchNorm statistics are averaged over the 8 devices by an
  all-reduce: within one process XLA adds the 8 values in one order; across
  2 processes gloo adds each process's 4 and then the 2 partial sums, which
  rounds differently, and 8 SGD steps carry that on. Integers (step, queue
  pointer, RNG key) must match exactly.
  """
  with jax.enable_x64(rounding.DTYPE == 'float64'):
    two = _restore(chain['workdir'], STEPS)
  rounding.assert_agree_to_rounding(two, reference['state'], f'2 processes vs 1, step {STEPS}')


@pytest.mark.slow
def test_knn_on_two_processes_equals_one_process(chain, reference):
  assert chain['d_rc'] == [0, 0], chain['tails']
  with open(chain['workdir'] / 'eval.json') as f:
    two = json.load(f)
  assert two['knn_step'] == reference['knn']['knn_step'] == STEPS
  assert two['knn_top1'] == reference['knn']['knn_top1']
  # Every process computed the same result; process 0 alone wrote eval.json.
  for log in chain['d_logs']:
    assert f"'knn_top1': {two['knn_top1']}" in log, log[-2000:]


@pytest.mark.slow
def test_only_process_0_writes_metrics_and_config(chain):
  workdir = chain['workdir']
  steps = [r['step'] for r in _rows(workdir) if 'train_loss' in r]
  # A logged 1-3 (and died in 4), B 4-5, C 6: each row once, from process 0 alone.
  assert steps == list(range(1, STEPS + 1)), steps
  assert os.path.exists(workdir / 'config.json')
  events = [f for f in os.listdir(workdir / 'tensorboard') if f.startswith('events')]
  assert len(events) <= 3, events  # One per training run of process 0.
  # stream_file_list.json: the train data's identity, which a resume checks (guard.data_identity).
  assert sorted(os.listdir(workdir)) == ['checkpoints', 'config.json', 'eval.json',
                                         'metrics.jsonl', 'stream_file_list.json', 'tensorboard']


@pytest.mark.slow
def test_export_of_a_two_process_checkpoint(chain, reference):
  with jax.enable_x64(rounding.DTYPE == 'float64'):
    path_two = export.run_export(_config(), str(chain['workdir']))
    path_one = export.run_export(_config(), str(reference['workdir']))
  two, one = np.load(path_two), np.load(path_one)
  assert sorted(two.files) == sorted(one.files) and 'conv1.weight' in two.files
  for key in one.files:  # float32 files of float64 runs: rounding, then two float32 roundings.
    if rounding.DTYPE == 'float64':
      np.testing.assert_allclose(two[key], one[key], rtol=np.finfo(np.float32).eps,
                                 atol=rounding.RTOL * max(np.abs(one[key]).max(), 1), err_msg=key)


def test_pmean_packed_is_pmean_in_one_all_reduce():
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(0)
  tree = {'w': rng.normal(size=(8, 3, 5)).astype(np.float32),
          'b': rng.normal(size=(8, 7)).astype(np.float32),
          'n': np.arange(8, dtype=np.int32).reshape(8, 1),
          's': rng.normal(size=(8,)).astype(np.float32)}
  spec = jax.sharding.PartitionSpec(parallel.AXIS)

  def run(fn):
    sharded = jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)
    return jax.jit(sharded), jax.device_get(jax.jit(sharded)(tree))

  packed, got = run(parallel.pmean_packed)
  _, want = run(lambda t: jax.lax.pmean(t, parallel.AXIS))
  for key in tree:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert packed.lower(tree).as_text().count('all_reduce') == 2  # One per dtype (float, int).


def test_processes_that_disagree_stop_at_once_naming_the_fields(tmp_path):
  """Issue 32, item 7: a process started with another config (or another WORKDIR's checkpoints)
  ends with process 0 before any work, both naming the differing fields and the process;
  nothing is written."""
  from moco_jax.run import distributed  # pylint: disable=g-import-not-at-top
  same = {'config.seed': 'a', 'config.batch_size': 'b'}
  assert distributed.disagreements({0: same, 1: dict(same), 2: dict(same)}) == []
  assert distributed.disagreements({0: same, 1: {**same, 'config.seed': 'c'},
                                    2: {**same, 'extra': 'd'}}) == [(1, ['config.seed']),
                                                                     (2, ['extra'])]
  workdir = tmp_path / 'run'
  procs = TwoProcesses(str(workdir), str(tmp_path), 'disagree',
                       only=((), ('--config.seed=1', '--config.moco.temperature=0.1')))
  codes = [procs.wait(i, RUN_TIMEOUT_S) for i in range(2)]
  assert codes == [2, 2], procs.tails()
  for i in range(2):
    last = [l for l in procs.log(i).splitlines() if l.strip()][-1]
    assert last.startswith('Error (distributed): The processes of this job disagree'), last
    assert 'process 1: config.moco.temperature, config.seed' in last, last
  assert not workdir.exists()


@pytest.mark.slow
def test_two_processes_on_a_streamed_unlabeled_list_give_the_one_process_checkpoint(tmp_path):
  """Your own images on a cluster (issue 30): a CSV list without labels, streamed (each process
  decodes its slice of every batch into canvases), 2 processes x 4 devices against 1 x 8."""
  import own_images  # pylint: disable=g-import-not-at-top
  data = own_images.make('csv_no_labels', tmp_path / 'images', count=32)
  fields = {'num_train_steps': 2, 'checkpoint_every_steps': 2, 'log_every_steps': 1,
            'model.dtype': rounding.DTYPE, 'data.path': data,
            # One image a device: at rounding.IMAGE_SIZE the last BatchNorm layers would see one
            # value a channel (1x1 maps), and the first step diverges; at 16 px, four.
            'data.cache_dir': str(tmp_path / 'cache'), 'data.image_size': 16,
            'batch_size': 8, 'moco.queue_size': 16, 'data.max_in_memory_gb': 0.0,
            'data.stream_processes': 0, 'data.num_workers': 2}
  run = TwoProcesses(tmp_path / 'two', tmp_path, 'listed',
                     flags=[f'--config.{k}={v}' for k, v in fields.items()])
  try:
    assert [run.wait(i, RUN_TIMEOUT_S) for i in range(2)] == [0, 0], run.tails()
  finally:
    run.kill()
  assert 'streaming it' in run.log(0) and 'streaming it' in run.log(1)
  config = helpers.tiny_config(**{k.replace('.', '__'): v for k, v in fields.items()})
  with rounding.precise(config) as config:
    one = jax.device_get(pretrain.train_and_evaluate(config, str(tmp_path / 'one')))
    with jax.enable_x64(rounding.DTYPE == 'float64'):
      two = jax.device_get(helpers.restore_checkpoint(tmp_path / 'two', config, 2))
  rounding.assert_agree_to_rounding(two, one, '2 processes vs 1 on a streamed CSV list')
