"""The run's own config (WORKDIR/config.json), derived fields and progress timing."""

import json

import pytest

from configs import default
from configs import imagenette
from configs import tiny
from moco_jax import cli
from moco_jax.core import errors
from moco_jax.data import spec as data_spec
from moco_jax.run import metrics_writer
from moco_jax.run import run_config


def _saved_run(tmp_path):
  config = tiny.get_config()
  config.data.image_size = 24
  run_config.write_run_config(str(tmp_path), config)
  return config


def test_config_json_comes_back_with_tuples_and_overrides(tmp_path):
  config = _saved_run(tmp_path)
  loaded = run_config.load_run_config(str(tmp_path))
  assert run_config.flatten(loaded) == run_config.flatten(config)
  assert isinstance(loaded.aug.mean, tuple) and isinstance(loaded.eval.linear_lrs, tuple)
  loaded = run_config.load_run_config(str(tmp_path), {'eval.knn_k': 7, 'aug.mean': [0.5] * 3})
  assert loaded.eval.knn_k == 7 and loaded.aug.mean == (0.5, 0.5, 0.5)
  assert loaded.data.image_size == 24
  with pytest.raises(KeyError, match='config.eval.no_such_field'):
    run_config.load_run_config(str(tmp_path), {'eval.no_such_field': 1})


def test_an_old_config_json_gets_the_new_fields_defaults(tmp_path):
  _saved_run(tmp_path)
  path = tmp_path / 'config.json'
  values = json.loads(path.read_text())
  del values['eval']['linear_protocol']
  path.write_text(json.dumps(values))
  assert run_config.load_run_config(
      str(tmp_path), defaults=default.get_config()).eval.linear_protocol == 'standardized'
  # The resume check does not compare a field the old run could not have written.
  config = tiny.get_config()
  config.data.image_size = 24
  config.eval.linear_protocol = 'raw'
  assert run_config.compare(values, config, ('eval.',)) == {}
  config.eval.knn_k = 3
  assert run_config.compare(values, config, ('eval.',)) == {'eval.knn_k': (200, 3)}


def test_a_broken_config_json_is_one_error_naming_file_and_line(tmp_path):
  (tmp_path / 'config.json').write_text('{"seed": 0,\n "batch_size": }')
  with pytest.raises(errors.ConfigError, match=r'config.json is not valid JSON \(line 2'):
    run_config.load_run_config(str(tmp_path))


def test_missing_config_json_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='config.json does not exist.*--config='):
    run_config.load_run_config(str(tmp_path))


def test_differences_name_the_fields_that_change_the_measurement(tmp_path):
  config = _saved_run(tmp_path)
  assert run_config.differences(config, str(tmp_path)) == {}
  config.data.image_size = 32
  config.eval.knn_k = 3  # Evaluation settings are meant to differ.
  config.data.num_workers = 1
  assert run_config.differences(config, str(tmp_path)) == {'data.image_size': (24, 32),
                                                            'data.cache_size': (24, 32)}
  config.data.image_size = 24
  config.data.cache_size = 24  # The same decoded size, given explicitly: no difference.
  assert run_config.differences(config, str(tmp_path)) == {}


def test_main_defaults_to_the_run_s_config_json(tmp_path):
  argv = ['main.py', '--mode=knn', f'--workdir={tmp_path}', '--config.eval.knn_k=5']
  assert cli.with_default_config(argv) == argv  # No config.json yet: left as is.
  _saved_run(tmp_path)
  assert cli.with_default_config(argv) == [
      'main.py', f'--config={cli.FROM_WORKDIR}:{tmp_path}'] + argv[1:]
  assert cli.with_default_config(['main.py', '--workdir', str(tmp_path)])[1].startswith(
      '--config=')
  explicit = argv + ['--config=configs/tiny.py']
  assert cli.with_default_config(explicit) == explicit


def test_the_decoded_size_follows_image_size_unless_pinned():
  config = imagenette.get_config()
  assert data_spec.decoded_side(config.data) == 146  # 128 / 0.875
  config.data.image_size = 96
  assert data_spec.decoded_side(config.data) == 110
  config.data.cache_size = 100
  assert data_spec.decoded_side(config.data) == 100
  assert data_spec.decoded_side(tiny.get_config().data) == 32


def test_progress_leaves_monitor_time_out_and_prints_every_30_s():
  now = [0.0]
  progress = metrics_writer.Progress(total_steps=100, start_step=0, global_batch=10,
                                     steps_per_epoch=10, clock=lambda: now[0])
  now[0] = 10.0  # 10 steps of training...
  with progress.paused():
    now[0] = 70.0  # ...then a 60 s kNN monitor.
  row = progress.update(10)
  assert row['images_per_sec'] == pytest.approx(10.0)  # 10 steps x 10 images / 10 s.
  assert row['eta_sec'] == pytest.approx(90.0)
  assert not progress.due()
  now[0] = 100.5
  assert progress.due()
  assert progress.peek(13)['steps_per_sec'] == pytest.approx(3 / 30.5)
  assert not progress.due()
