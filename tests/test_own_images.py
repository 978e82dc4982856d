"""Your own images: unlabeled folders at any depth, CSV / text lists, held-out eval splits."""

import os

import numpy as np
import pytest

from configs import tiny
from moco_jax.core import errors
from moco_jax.data import eval_reader
from moco_jax.data import listed
from moco_jax.data import sources
from moco_jax.evaluation import knn
from moco_jax.evaluation import linear_probe
from moco_jax.data import spec as data_spec
from tests import own_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(path, tmp_path, **overrides):
  config = tiny.get_config()
  config.data.path = str(path)
  config.data.image_size = 16
  config.data.cache_dir = str(tmp_path / 'cache')
  config.data.num_workers = 2
  config.batch_size = 16
  config.eval.batch_size = 16
  for key, value in overrides.items():
    section, _, field = key.rpartition('.')
    (config[section] if section else config)[field] = value
  return config


# --------------------------------------------------------------------------
# Listing: which images, in which order, with which labels.


def test_a_flat_folder_is_every_image_sorted_and_unlabeled(tmp_path):
  names = own_images.flat_folder(tmp_path / 'flat', 12)
  config = _config(tmp_path / 'flat', tmp_path)
  assert sources.from_config(config).spec.kind == 'listed'
  found = listed.listing(sources.from_config(config).spec, 'train')
  assert found.names == names and found.class_names == [] and (found.labels == -1).all()


def test_a_nested_folder_lists_every_depth_and_skips_non_images(tmp_path):
  names = own_images.nested_folder(tmp_path / 'nested', 13)
  found = listed.listing(sources.from_config(_config(tmp_path / 'nested', tmp_path, **{'data.labels': 'none'})).spec,
                         'train')
  assert found.names == names  # notes.txt left out; depths 1 to 3.


def test_csv_with_labels_keeps_list_order_and_numbers_sorted_classes(tmp_path):
  path, rows = own_images.csv_list(tmp_path, 9)
  found = listed.listing(sources.from_config(_config(path, tmp_path)).spec, 'train')
  assert found.names == [p for p, _ in rows]
  assert found.class_names == ['cat', 'dog', 'eel']
  assert [found.class_names[i] for i in found.labels] == [c for _, c in rows]
  unlabeled = listed.listing(sources.from_config(_config(path, tmp_path, **{'data.labels': 'none'})).spec, 'train')
  assert unlabeled.class_names == [] and (unlabeled.labels == -1).all()


def test_text_lists_with_and_without_labels(tmp_path):
  path, rows = own_images.csv_list(tmp_path / 'a', 6, labels=True, name='list.txt')
  assert listed.listing(sources.from_config(_config(path, tmp_path)).spec, 'train').class_names == ['cat', 'dog', 'eel']
  path, rows = own_images.csv_list(tmp_path / 'b', 6, labels=False, name='list.txt')
  found = listed.listing(sources.from_config(_config(path, tmp_path)).spec, 'train')
  assert found.names == [p for p, _ in rows] and found.class_names == []


def test_held_out_fraction_is_fixed_disjoint_and_complete(tmp_path):
  names = own_images.flat_folder(tmp_path / 'flat', 30)
  config = _config(tmp_path / 'flat', tmp_path, **{'data.val_fraction': 0.2, 'seed': 5})
  train = listed.listing(sources.from_config(config).spec, 'train').names
  held = listed.listing(sources.from_config(config).spec, 'eval').names
  assert len(held) == 6 and len(train) == 24
  assert sorted(train + held) == names and not set(train) & set(held)
  config.seed = 7  # The holdout does not follow config.seed: a fixed split for every run.
  assert listed.listing(sources.from_config(config).spec, 'eval').names == held
  # A slow reference: the first round(0.2 * 30) of a seed-0 permutation of the sorted names.
  order = np.random.default_rng(listed.HOLDOUT_SEED).permutation(30)
  assert held == sorted(names[i] for i in order[:6])


def test_a_folder_with_train_and_val_directories_uses_them(tmp_path):
  own_images.flat_folder(tmp_path / 'root' / 'train' / 'x' / 'y', 5)  # Deeper than class/.
  own_images.flat_folder(tmp_path / 'root' / 'val', 3)
  config = _config(tmp_path / 'root', tmp_path, **{'data.labels': 'none'})
  assert len(listed.listing(sources.from_config(config).spec, 'train').names) == 5
  assert len(listed.listing(sources.from_config(config).spec, 'eval').names) == 3


def test_in_memory_and_streamed_reads_give_the_same_images(tmp_path):
  own_images.nested_folder(tmp_path / 'nested', 11)
  config = _config(tmp_path / 'nested', tmp_path, **{'data.labels': 'none'})
  in_memory = sources.from_config(config).load('train')
  source = sources.from_config(config).open('train')
  assert len(source) == len(in_memory) == 11
  side = data_spec.decoded_side(config.data)
  streamed = eval_reader.decode_subset(source, np.arange(len(source)), side, 2)
  np.testing.assert_array_equal(streamed.images, in_memory.images)
  assert in_memory.class_names == [] and (in_memory.labels == -1).all()
  # The cache is keyed by the files: a second load reads it back.
  np.testing.assert_array_equal(sources.from_config(config).load('train').images,
                                in_memory.images)


def test_the_streamed_fingerprint_changes_with_a_file(tmp_path):
  own_images.flat_folder(tmp_path / 'flat', 6)
  config = _config(tmp_path / 'flat', tmp_path)
  before = sources.from_config(config).open('train').fingerprint()
  with open(tmp_path / 'flat' / 'img_003.png', 'ab') as f:
    f.write(b'\0')
  after = sources.from_config(config).open('train').fingerprint()
  assert before['count'] == after['count'] and before['sha256'] != after['sha256']


def test_an_unlabeled_archive_is_read_in_memory(tmp_path):
  import tarfile  # pylint: disable=g-import-not-at-top
  names = own_images.flat_folder(tmp_path / 'flat', 7)
  with tarfile.open(tmp_path / 'flat.tgz', 'w:gz') as tar:
    tar.add(tmp_path / 'flat', arcname='flat')
  config = _config(tmp_path / 'flat.tgz', tmp_path, **{'data.labels': 'none'})
  ds = sources.from_config(config).load('train')
  directory = sources.from_config(_config(tmp_path / 'flat', tmp_path)).load('train')
  assert len(ds) == len(names) and ds.class_names == []
  np.testing.assert_array_equal(ds.images, directory.images)


# --------------------------------------------------------------------------
# Bad inputs: one message naming the file or field and the fix.


@pytest.mark.parametrize('case', ['missing_list', 'missing_image', 'empty_folder',
                                  'csv_without_labels', 'empty_holdout', 'labels_value',
                                  'csv_on_folder', 'no_eval_split'])
def test_bad_inputs_name_the_field_and_the_fix(tmp_path, case):
  if case == 'missing_list':
    config, needle = _config(tmp_path / 'nope.csv', tmp_path), 'nope.csv'
  elif case == 'missing_image':
    path, _ = own_images.csv_list(tmp_path, 4)
    os.remove(tmp_path / 'images' / 'p002.png')
    config, needle = _config(path, tmp_path), 'p002.png'
  elif case == 'empty_folder':
    (tmp_path / 'empty' / 'sub').mkdir(parents=True)
    (tmp_path / 'empty' / 'sub' / 'readme.txt').write_text('x')
    config, needle = _config(tmp_path / 'empty', tmp_path), 'has no image files'
  elif case == 'csv_without_labels':
    path, _ = own_images.csv_list(tmp_path, 4, labels=False)
    config, needle = _config(path, tmp_path, **{'data.labels': 'csv'}), 'no label column'
  elif case == 'empty_holdout':
    own_images.flat_folder(tmp_path / 'flat', 10)
    config = _config(tmp_path / 'flat', tmp_path, **{'data.val_fraction': 0.01})
    needle = 'data.val_fraction=0.01 of the 10 images'
  elif case == 'labels_value':
    own_images.flat_folder(tmp_path / 'flat', 3)
    config, needle = _config(tmp_path / 'flat', tmp_path, **{'data.labels': 'yes'}), 'data.labels'
  elif case == 'csv_on_folder':
    own_images.flat_folder(tmp_path / 'flat', 3)
    config, needle = _config(tmp_path / 'flat', tmp_path, **{'data.labels': 'csv'}), 'data.labels=csv'
  else:
    own_images.flat_folder(tmp_path / 'flat', 3)
    config, needle = _config(tmp_path / 'flat', tmp_path), 'data.val_fraction'
  split = 'eval' if case == 'no_eval_split' else 'train'
  with pytest.raises(errors.UserError) as raised:
    sources.from_config(config).load(split)
  message = str(raised.value)
  assert needle in message and ('--config.' in message or 'fix them' in message), message
  assert '\n' not in message  # One line.
  assert not (tmp_path / 'cache').exists() or not any((tmp_path / 'cache').iterdir())


@pytest.mark.parametrize('labels', ['none', 'one_class'])
def test_knn_and_linear_refuse_an_unlabeled_or_one_class_split(tmp_path, labels):
  if labels == 'none':
    own_images.flat_folder(tmp_path / 'flat', 8)
    config = _config(tmp_path / 'flat', tmp_path, **{'data.val_fraction': 0.25})
  else:
    path, rows = own_images.csv_list(tmp_path, 6)
    with open(path, 'w') as f:
      f.write('path,label\n' + ''.join(f'{p},same\n' for p, _ in rows))
    config = _config(path, tmp_path, **{'data.val_fraction': 0.5})
  workdir = tmp_path / 'run'
  for run in (knn.run_knn, linear_probe.run_linear_eval):
    with pytest.raises(errors.DataError, match='--mode=embed'):
      run(config, str(workdir))
  assert not workdir.exists()  # Refused before anything was written.


def test_splits_inside_one_top_folder_are_found(tmp_path):
  own_images.flat_folder(tmp_path / 'root' / 'top' / 'train' / 'a', 4)
  own_images.flat_folder(tmp_path / 'root' / 'top' / 'val' / 'b', 2)
  config = _config(tmp_path / 'root', tmp_path, **{'data.labels': 'none'})
  assert len(listed.listing(sources.from_config(config).spec, 'train').names) == 4
  assert len(listed.listing(sources.from_config(config).spec, 'eval').names) == 2


def test_mixed_channel_counts_in_one_folder_name_the_odd_file(tmp_path):
  own_images.flat_folder(tmp_path / 'mixed', 6, mode='L')
  own_images.flat_folder(tmp_path / 'rgb', 1, seed=9)
  os.replace(tmp_path / 'rgb' / 'img_000.png', tmp_path / 'mixed' / 'odd.png')
  config = _config(tmp_path / 'mixed', tmp_path, **{'data.channels': 1})
  with config.ignore_type():
    config.aug.mean, config.aug.std = (0.5,), (0.25,)
  for read in (lambda: sources.from_config(config).load('train'),
               lambda: eval_reader.decode_subset(sources.from_config(config).open('train'),
                                                 np.arange(7), 16, 2)):
    with pytest.raises(errors.DataError) as raised:
      read()
    message = str(raised.value)
    assert 'odd.png has 3 channel(s)' in message and 'data.channels=1' in message, message
  # Grayscale alone reads as one channel.
  os.remove(tmp_path / 'mixed' / 'odd.png')
  assert sources.from_config(config).load('train').images.shape == (6, 16, 16, 1)


def test_channels_other_than_3_are_refused_for_an_imagefolder_tree(tmp_path):
  own_images.flat_folder(tmp_path / 'tree' / 'train' / 'cls', 2)
  config = _config(tmp_path / 'tree', tmp_path, **{'data.channels': 4})
  with pytest.raises(errors.ConfigError, match='data.channels=4'):
    sources.from_config(config).load('train')


def test_auto_reads_folders_inside_folders_as_a_tree(tmp_path):
  """A typo in data.train_split on a labelled tree is an error, not 'every image, unlabeled'."""
  own_images.flat_folder(tmp_path / 'tree' / 'train' / 'cls', 2)
  config = _config(tmp_path / 'tree', tmp_path, **{'data.train_split': 'trian'})
  assert sources.from_config(config).spec.kind == 'folder'
  with pytest.raises(errors.DataError, match='data.labels=none'):
    sources.from_config(config).load('train')
  own_images.flat_folder(tmp_path / 'one_level' / 'a', 2)  # One level of folders: listed.
  assert sources.from_config(_config(tmp_path / 'one_level', tmp_path)).spec.kind == 'listed'


@pytest.mark.parametrize('kind', ['npy13', 'tiff16_4', 'gray_png_1'])
def test_streamed_canvases_keep_each_files_channels(tmp_path, kind):
  """The device-crop loader reads C-channel files into [S, S, C] canvases: each image whole in
  the top-left (the same uint8 values the in-memory path starts from), zero elsewhere."""
  from moco_jax.data import canvas_loader  # pylint: disable=g-import-not-at-top
  from moco_jax.data import channels as channels_lib  # pylint: disable=g-import-not-at-top
  config = _config(own_images.make(kind, tmp_path / kind, count=12), tmp_path)
  own_images.apply(kind, config)
  channels = config.data.channels
  source = sources.from_config(config).open('train')
  load = canvas_loader.LoadCanvasBatch(source, global_batch=8, seed=0, process_index=0,
                                       process_count=1, canvas_side=32, channels=channels)
  batch = load(0)
  assert batch['image'].shape == (8, 32, 32, channels) and not batch['reduced'].any()
  for canvas, (h, w), index in zip(batch['image'], batch['size'], batch['index']):
    name = source.name(int(index))
    whole = channels_lib.read_uint8(source.read(int(index)), name, channels)
    np.testing.assert_array_equal(canvas[:h, :w], whole, err_msg=name)
    assert not canvas[h:].any() and not canvas[:, w:].any()
  # A canvas smaller than the images: each reduced to fit, the flag set.
  small = canvas_loader.LoadCanvasBatch(source, global_batch=8, seed=0, process_index=0,
                                        process_count=1, canvas_side=12, channels=channels)(0)
  assert small['reduced'].all() and (small['size'].max(axis=1) == 12).all()


def test_streamed_canvases_name_a_file_with_another_channel_count(tmp_path):
  from moco_jax.data import canvas_loader  # pylint: disable=g-import-not-at-top
  from moco_jax.data import channels as channels_lib  # pylint: disable=g-import-not-at-top
  own_images.npy_folder(tmp_path / 'mixed', 8, channels=13)
  np.save(tmp_path / 'mixed' / 'sub' / 'a_000.npy', np.zeros((20, 20, 4), np.float32))
  config = _config(tmp_path / 'mixed', tmp_path, **{'data.channels': 13})
  source = sources.from_config(config).open('train')
  load = canvas_loader.LoadCanvasBatch(source, global_batch=8, seed=0, process_index=0,
                                       process_count=1, canvas_side=32, channels=13)
  with pytest.raises(channels_lib.ChannelError, match=r'a_000\.npy has 4 channel'):
    load(0)
