"""The benchmark harness: it runs, measures something, and refuses bad timings.

No speed is asserted (CI machines are shared); what is checked is that the
numbers exist and that the guards a GPU session relies on actually fire.
"""

import io
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import helpers
from benchmarks.peer import bench_peer
from benchmarks import bench_train
from benchmarks import flops as flops_lib
from moco_jax.training import state as state_lib

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_tiny_preset_runs_and_measures(tmp_path):
  # A fresh interpreter: 2 simulated devices (so FLOPs are scaled by the device
  # count), and XLA's CPU backend optimisation off (JAX_DISABLE_MOST_OPTIMIZATIONS from
  # tests/conftest.py), which cuts compilation ~10x here; the harness code path is the same.
  out = tmp_path / 'result.json'
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=helpers.xla_flags(2))
  subprocess.run([sys.executable, os.path.join(_ROOT, 'benchmarks', 'bench_train.py'),
                  '--preset=tiny', '--steps=2', '--warmup=0', f'--json_out={out}'],
                 check=True, env=env, cwd=_ROOT, timeout=300)
  result = bench_train.Result(**json.loads(out.read_text()))
  assert result.num_devices == 2
  assert result.images_per_second > 0
  assert result.flops_per_image > 0
  assert math.isfinite(result.final_loss)
  assert result.mfu is None and result.peak_tflops is None  # CPU: no stated peak.
  row = result.as_row()
  assert row.startswith('| tiny | resnet_tiny_cifar | 32 | 64 |')
  assert row.count('|') == bench_train.TABLE_HEADER.splitlines()[0].count('|')
  assert '| n/a |' in row


def test_recompilation_guard_fires_when_the_state_changes_shape():
  # A step whose state grows (here: the queue) is compiled twice; the guard
  # must refuse the timing rather than report compile time as step time.
  def state(queue_size):
    return state_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params={'w': jnp.ones(3)}, batch_stats={},
        opt_state=(), method_state={'queue': jnp.zeros((queue_size, 4))},
        rng=jax.random.PRNGKey(0))

  step = jax.jit(lambda s: s.replace(step=s.step + 1))
  step(state(8))
  step(state(8))
  bench_train.check_no_recompilation(step)  # Same shapes: one compilation.
  step(state(16))
  with pytest.raises(RuntimeError, match='compiled 2 times'):
    bench_train.check_no_recompilation(step)


def test_presets_build_valid_configs():
  config = bench_train.make_config('r50_224', dtype='bfloat16', batch=128)
  assert (config.model.name, config.data.image_size, config.batch_size,
          config.moco.queue_size, config.model.dtype) == ('resnet50', 224, 128, 65536, 'bfloat16')
  cifar = bench_train.make_config('cifar_r18')
  assert (cifar.model.stem, cifar.data.image_size, cifar.batch_size) == ('cifar', 32, 512)
  with pytest.raises(ValueError, match='--preset'):
    bench_train.make_config('r101')


def test_stated_peaks():
  assert bench_train.stated_peak_tflops('NVIDIA H100 80GB HBM3') == 989.0
  assert bench_train.stated_peak_tflops('NVIDIA H100 PCIe') == 756.0
  assert bench_train.stated_peak_tflops('NVIDIA H200') == 989.0
  assert bench_train.stated_peak_tflops('cpu') is None


def test_append_docs_never_overwrites(tmp_path):
  path = str(tmp_path / 'benchmarks.md')
  bench_train.append_docs(['| row 1 |'], 'cmd one', path=path)
  text = open(path).read()
  assert text.startswith('# Benchmarks\n') and '## Training throughput' in text
  with open(path, 'a') as f:
    f.write('\n## Evaluation speed\n\nsomeone else\n')
  bench_train.append_docs(['| row 2 |'], 'cmd two', path=path)
  text = open(path).read()
  # Both runs kept, in order, inside our section; the other section untouched, after it.
  assert text.index('| row 1 |') < text.index('| row 2 |') < text.index('## Evaluation speed')
  assert text.rstrip().endswith('someone else')
  assert text.count('## Training throughput') == 1


def test_merge_docs_copies_gpu_tables_into_their_sections(tmp_path):
  # A GPU machine writes a fresh file under $OUT; merging puts each table in its section.
  remote, local = str(tmp_path / 'remote.md'), str(tmp_path / 'local.md')
  bench_train.append_docs(['| gpu row |'], 'train cmd', path=remote)
  bench_train.append_docs(['| peer row |'], 'peer cmd', path=remote,
                          section=bench_peer.DOCS_SECTION, header=bench_peer.PEER_HEADER)
  with open(local, 'w') as f:
    f.write('# Benchmarks\n\n## Training throughput\n\nintro\n\n'
            f'{bench_peer.DOCS_SECTION}\n\npeer intro\n\n## Input pipeline\n\ntheirs\n')
  assert bench_train.merge_docs(remote, local) == 2
  text = open(local).read()
  assert (text.index('intro') < text.index('| gpu row |') < text.index(bench_peer.DOCS_SECTION)
          < text.index('peer intro') < text.index('| peer row |') < text.index('## Input pipeline'))
  assert text.rstrip().endswith('theirs')
  empty = tmp_path / 'empty.md'
  empty.write_text('# Benchmarks\n')
  with pytest.raises(ValueError, match='no non-empty section'):
    bench_train.merge_docs(str(empty), local)


_LOG = '\n'.join(
    [f'Epoch: [0][{i:2d}/36]\tTime  {t:.3f} ( 0.500)\tData  {d:.3f} ( 0.1)\tLoss 1.0e+01 (1.0e+01)'
     for i, t, d in [(0, 5.0, 4.0)] + [(i, 0.25, 0.05) for i in range(1, 36)]]
    + ['Epoch: [1][ 0/36]\tTime  3.000 ( 3.000)\tData  2.900 ( 2.9)\tLoss 1.0e+01 (1.0e+01)'])


def test_peer_log_parser_skips_warmup_and_epoch_starts():
  result = bench_peer.parse_log(_LOG, batch=256, skip=1)
  assert result['steps'] == 35
  assert result['images_per_second'] == pytest.approx(256 / 0.25)
  assert result['compute_images_per_second'] == pytest.approx(256 / 0.2)
  with pytest.raises(ValueError, match='--print-freq 1'):
    bench_peer.parse_log('no progress here', batch=256)


def test_peer_window_protocol(monkeypatch):
  # The CPU comparison drives both workers through this loop: one JSON line
  # to say ready, then one timing per request, until an empty line.
  out = io.StringIO()
  monkeypatch.setattr(sys, 'stdin', io.StringIO('2\n3\n\n'))
  monkeypatch.setattr(sys, 'stdout', out)
  bench_peer._serve(lambda steps: 0.5 * steps, {'device': 'test'})  # pylint: disable=protected-access
  lines = [json.loads(line) for line in out.getvalue().splitlines()]
  assert lines == [{'ready': True, 'device': 'test'}, {'seconds': 1.0}, {'seconds': 1.5}]


def test_analytic_macs_match_torchvisions_published_counts():
  # torchvision's model docs list 1.81 (ResNet-18) and 4.09 (ResNet-50) "GFLOPS" (= GMACs,
  # every kernel tap counted) at 224 px with a 1000-way fc; our head replaces the fc.
  for name, head, published in (('resnet18', (512,), 1.814), ('resnet50', (2048,), 4.089)):
    macs, _ = flops_lib.encoder_macs(name, 64, 'imagenet', 224, (), 1000, exact=False)
    assert abs(macs / 1e9 - published) < 0.0005  # The published figures' last digit.
    exact, first = flops_lib.encoder_macs(name, 64, 'imagenet', 224, head, 128)
    assert first == 3 * 64 * _exact_taps(224, 7, 2, 3) ** 2
    assert 0.9 * macs < exact < macs  # Padding taps: 7% (R18), 3% (R50) at 224 px.


def _exact_taps(size, kernel, stride, pad):
  """Valid taps of one axis, written out differently: positions inside [0, size)."""
  total = 0
  for start in range(-pad, size + pad - kernel + 1, stride):
    total += len(set(range(start, start + kernel)) & set(range(size)))
  return total


def test_tiny_step_flops_match_the_analytic_count():
  # XLA's count of the compiled step (nothing runs) against flops.py's count from the layer
  # shapes. XLA counts every multiply-add with real input (not the zero-padding taps: the
  # `exact` count) plus elementwise work (BatchNorm, ReLU, the optimiser, EMA) at one FLOP
  # per element op. So it can never be below the exact count (that would mean work skipped),
  # and the elementwise excess of this width-8 net is about 11% (BatchNorm and ReLU fwd and
  # bwd cost ~70 FLOPs per activation element against 2 x 9 x C_in = 144-1152 per MAC-ed
  # output). 1.2 leaves room for elementwise changes and none for hidden compute: the smallest
  # extra pass, one more key forward, adds 2M of 8M (+25%).
  config = bench_train.make_config('tiny')
  result = bench_train.compile_only(config, preset='tiny', devices=jax.devices()[:1])
  analytic = flops_lib.config_step_flops(config)
  ratio = result.xla_flops_per_image / analytic.total
  assert 1.0 <= ratio < 1.2, (result.xla_flops_per_image, analytic)
  # The published convention (every tap) is what the docs compare R50 against.
  assert flops_lib.config_step_flops(config, exact=False).total > analytic.total
  assert result.peak_bytes > result.argument_bytes > 0
  assert result.as_row().count('|') == bench_train.COMPILE_HEADER.splitlines()[0].count('|')
