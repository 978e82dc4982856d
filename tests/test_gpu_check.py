"""The dry parts of benchmarks/gpu_check.py: plan, stage runner, summary, what travels.

The GPU run itself and its CPU rehearsal (`bash benchmarks/gpu_check.sh --rehearse`,
minutes) are not run here; these tests check the pieces that decide whether a
15-minute GPU lease returns figures: every stage is planned and its files
exist, a stage is stopped at its budget and its partial output kept, the
summary is derived right, and what travels is measured and refused over 64 MiB.
"""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import gpu_check

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_plan_covers_the_issue_and_rehearsal_runs_the_same_stages(tmp_path):
  gpu = gpu_check.plan(gpu_check.parse_args([]), str(tmp_path))
  names = [s.name for s in gpu]
  # Most wanted first: ours and the official step before the long time-to-accuracy run.
  assert names[:6] == ['env', 'ours_bf16', 'official_fp32', 'official_bf16', 'ours_fp32',
                       'time_to_accuracy']
  assert {'mem32_bf16', 'mem32_fp32', 'queue_big_bf16'} <= set(names)
  assert sum(n.startswith('xla_') for n in names) == len(gpu_check.XLA_VARIANTS)
  by_name = {s.name: s for s in gpu}
  assert '--preset=r50_224' in by_name['ours_bf16'].cmd and '--batch=256' in by_name['ours_bf16'].cmd
  assert '--batch=32' in by_name['mem32_fp32'].cmd
  assert '--queue=1048576' in by_name['queue_big_bf16'].cmd
  assert '--device=cuda' in by_name['official_bf16'].cmd and '--amp=bf16' in by_name['official_bf16'].cmd
  for stage in gpu:  # Every script a stage runs is in the repository.
    assert os.path.exists(stage.cmd[1]), stage.cmd
  tta = by_name['time_to_accuracy']
  assert tta.soft_stop_s == 120 and tta.budget_s > tta.soft_stop_s
  assert any(a.endswith(gpu_check.ARCHIVE) for a in tta.cmd)
  rehearse = gpu_check.plan(gpu_check.parse_args(['--rehearse']), str(tmp_path))
  assert [s.name for s in rehearse] == names[:len(rehearse)]
  assert '--device=cpu' in {s.name: s for s in rehearse}['official_fp32'].cmd
  with pytest.raises(SystemExit, match='unknown stages'):
    gpu_check.plan(gpu_check.parse_args(['--only=ours_bf16,nope']), str(tmp_path))


def test_stage_runner_soft_stops_then_kills_and_keeps_the_output(tmp_path, monkeypatch):
  monkeypatch.setattr(gpu_check, 'GRACE_S', 1)
  log = str(tmp_path / 'stages.log')
  # A child that ends cleanly (75, as main.py) on SIGTERM: the soft stop is a normal end.
  polite = ('import signal, sys, time\n'
            'signal.signal(signal.SIGTERM, lambda *a: (print("saved", flush=True), sys.exit(75)))\n'
            'print("started", flush=True)\n'
            'time.sleep(60)\n')
  seen = []
  proc = gpu_check.run_process([sys.executable, '-c', polite], {}, timeout_s=30, log_path=log,
                               soft_stop_s=1.0, on_poll=seen.append)
  assert proc['returncode'] == 75 and proc['stopped'] and not proc['timed_out']
  assert 'started' in proc['stdout'] and 'saved' in proc['stdout']
  assert proc['seconds'] < 10 and seen and proc['maxrss_bytes'] > 0
  # A child that ignores SIGTERM is killed once the grace period is over.
  stubborn = ('import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n'
              'print("working", flush=True)\ntime.sleep(60)\n')
  proc = gpu_check.run_process([sys.executable, '-c', stubborn], {}, timeout_s=1.0, log_path=log)
  assert proc['timed_out'] and proc['returncode'] == -9 and proc['seconds'] < 10
  text = open(log).read()
  assert text.count('=====') == 2 and 'working' in text


def test_log_is_capped(tmp_path):
  log = str(tmp_path / 'stages.log')
  gpu_check._append_capped(log, 'x' * 5000, limit=1000)
  gpu_check._append_capped(log, 'more', limit=1000)
  assert os.path.getsize(log) <= 1000
  assert 'size cap' in open(log).read()


def test_time_to_accuracy_summary_projects_200_epochs():
  # 36 steps per epoch; kNN after epochs 1, 2, 3 at 40 s, 50 s, 62 s of wall time.
  rows = [{'step': 12, 'images_per_sec': 9000.0, 'epoch': 0.33, 'wall_s': 35.0},
          {'step': 24, 'images_per_sec': 10000.0, 'epoch': 0.67, 'wall_s': 36.0},
          {'step': 36, 'images_per_sec': 11000.0, 'epoch': 1.0, 'wall_s': 37.0},
          {'step': 36, 'knn_top1': 20.0, 'epoch': 1.0, 'wall_s': 40.0},
          {'step': 72, 'knn_top1': 25.0, 'epoch': 2.0, 'wall_s': 50.0},
          {'step': 108, 'knn_top1': 30.0, 'epoch': 3.0, 'wall_s': 62.0}]
  result = gpu_check.tta_summary(rows, train_images=9469)
  assert [c['knn_top1'] for c in result['knn_curve']] == [20.0, 25.0, 30.0]
  assert result['epochs_done'] == 3.0
  assert result['train_images_per_second'] == 10000.0  # The median interval.
  assert result['projected_train_seconds'] == pytest.approx(200 * 9469 / 10000)
  assert result['wall_seconds_per_epoch'] == 11.0  # median(10, 12)
  assert result['projected_wall_seconds'] == pytest.approx(40 + 199 * 11.0)
  assert gpu_check.tta_summary([]) == {'knn_curve': [], 'epochs_done': 0.0}


def test_derived_ratios_and_the_atomic_summary(tmp_path):
  results = {
      'ours_bf16': {'images_per_second': 6000.0, 'step_seconds': 256 / 6000, 'queue': 65536},
      'official_bf16': {'images_per_second': 2000.0},
      'official_fp32': {'images_per_second': 1000.0},
      'queue_big_bf16': {'images_per_second': 5000.0, 'step_seconds': 256 / 5000,
                         'queue': 1048576},
      'xla_latency_hiding': {'images_per_second': 6600.0},
  }
  derived = gpu_check.derive(results)
  assert derived['ours_bf16_over_official_bf16'] == 3.0
  assert derived['ours_bf16_over_official_fp32'] == 6.0
  assert 'ours_fp32_over_official_fp32' not in derived  # Missing stage: no ratio.
  assert derived['queue_step_ms']['1048576'] == pytest.approx(1000 * 256 / 5000)
  assert derived['xla_variant_speedup_vs_default'] == {'xla_latency_hiding': pytest.approx(1.1)}
  path = str(tmp_path / 'summary.json')
  gpu_check.write_json_atomic(path, {'derived': derived})
  assert json.load(open(path))['derived'] == json.loads(json.dumps(derived))
  assert not os.path.exists(path + '.tmp')


def test_size_check_measures_what_travels(tmp_path, monkeypatch, capsys):
  repo = tmp_path / 'repo'
  (repo / '.whl').mkdir(parents=True)
  subprocess.run(['git', 'init', '-q', str(repo)], check=True)
  (repo / '.gitignore').write_text('/.whl/\n/big.bin\n')
  (repo / 'code.py').write_text('x = 1\n' * 100)
  (repo / 'big.bin').write_bytes(b'0' * 4096)  # Ignored and not carried: does not travel.
  (repo / '.whl' / 'a.whl').write_bytes(b'0' * 2048)
  sizes = gpu_check.carried_bytes(str(repo), carry=('.whl',))
  assert sizes == {'working_tree': len('x = 1\n' * 100) + len('/.whl/\n/big.bin\n'),
                   '.whl': 2048}
  assert gpu_check.size_check(str(repo), carry=('.whl',)) == 0
  assert gpu_check.size_check(str(repo), carry=('.whl', '.peer')) == 1
  assert 'Error (carry): .peer missing' in capsys.readouterr().out
  monkeypatch.setattr(gpu_check, 'CARRY_LIMIT', 1024)
  assert gpu_check.size_check(str(repo), carry=('.whl',)) == 1
  assert 'over the' in capsys.readouterr().out


def test_render_makes_the_docs_tables(tmp_path):
  ours = dict(preset='r50_224', model='resnet50', image_size=224, batch=256, queue=65536,
              dtype='bfloat16', num_devices=1, device_kind='NVIDIA H200', feed='device',
              steps=20, step_seconds=0.05, images_per_second=5120.0, flops_per_image=32.5e9,
              achieved_tflops=166.4, peak_tflops=989.0, mfu=0.168, peak_memory_bytes=30 * 2**30,
              compile_seconds=60.0, epoch_images=1281167, final_loss=9.0,
              host_peak_rss_bytes=2**30)
  official = dict(system='official', commit='7397dfe', arch='resnet50', image_size=224,
                  batch=256, queue=65536, amp='bf16', device='NVIDIA H200', torch='2.11.0',
                  steps=10, first_step_seconds=5.0, step_seconds=0.128,
                  images_per_second=2000.0, peak_memory_bytes=20 * 2**30,
                  host_peak_rss_bytes=2**31)
  tta = gpu_check.tta_summary([{'epoch': 1.0, 'knn_top1': 21.5, 'wall_s': 60.0, 'step': 36},
                               {'epoch': 2.0, 'knn_top1': 30.0, 'wall_s': 62.0, 'step': 72},
                               {'epoch': 2.0, 'images_per_sec': 9469.0, 'wall_s': 62.0}])
  summary = dict(mode='gpu', started_utc='2026-12-01 10:00:00', finished_s=500.0,
                 stages={'ours_bf16': {'status': 'ok', 'seconds': 80.0},
                         'official_bf16': {'status': 'ok', 'seconds': 30.0},
                         'time_to_accuracy': {'status': 'ok', 'seconds': 130.0},
                         'xla_autotune_off': {'status': 'skipped'}},
                 results={'ours_bf16': ours, 'official_bf16': official, 'time_to_accuracy': tta},
                 derived=gpu_check.derive({'ours_bf16': ours, 'official_bf16': official}))
  path = tmp_path / 'summary.json'
  path.write_text(json.dumps(summary))
  text = gpu_check.render(str(path))
  assert '| xla_autotune_off | skipped |  |' in text
  assert '| ours_bf16 | r50_224 | resnet50 | 224 | 256 |' in text and '30.00 GiB' in text
  assert '| official_bf16 | resnet50 | 224 | 256 | 65536 | bf16 | NVIDIA H200 | 128.0 | 2000.0 | 20.00 GiB |' in text
  assert 'ep 1: 21.5% at 60 s, ep 2: 30.0% at 62 s' in text
  assert 'Projected 200 epochs: 3.3 min of train steps (9469 img/s)' in text
  assert '"ours_bf16_over_official_bf16": 2.56' in text


def test_a_gpu_run_on_a_cpu_stops_at_once_naming_rehearse(tmp_path, capsys):
  """Issue 32, item 9: without --rehearse on a CPU backend, no stage starts."""
  assert gpu_check.backend_refusal(True, 'cpu') is None
  assert gpu_check.backend_refusal(False, 'gpu') is None
  assert '--rehearse' in gpu_check.backend_refusal(False, 'cpu')
  # The real backend of this machine (a CPU under the tests): main() refuses before any work.
  out = tmp_path / 'out'
  assert gpu_check.main([f'--out={out}']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('Error (device):') and '--rehearse' in err[0]
  assert not out.exists()


def test_every_stage_missing_a_prerequisite_is_skipped_with_its_fix(tmp_path, monkeypatch):
  """Each prerequisite, missing alone, skips exactly the stages that need it, naming the fix;
  the summary says so instead of a child's traceback."""
  stages = gpu_check.plan(gpu_check.parse_args(['--rehearse']), str(tmp_path))
  needers = {n: {s.name for s in stages if n in s.needs} for n in gpu_check.PREREQUISITES}
  assert needers['peer'] == needers['torch'] == {'official_fp32', 'official_bf16'}
  assert needers['archive'] == {'time_to_accuracy', 'packed_stream'}
  real = dict(gpu_check.PREREQUISITES)
  for name, (_, fix) in real.items():
    monkeypatch.setattr(gpu_check, 'PREREQUISITES',
                        {n: ((lambda n=n, name=name: n == name), f)
                         for n, (_, f) in real.items()})
    for stage in stages:
      missing = gpu_check.missing_prerequisites(stage)
      assert missing == ([fix] if stage.name in needers[name] else []), (name, stage.name)
  assert '--prepare' in real['archive'][1] and '--prepare' in real['peer'][1]
  assert 'pip install torch' in real['torch'][1]
