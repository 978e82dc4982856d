"""The tfds source: a prepared TensorFlow Datasets split, decoded once or read at random.

`load_tfds` decodes a split into memory (cached); `open_tfds_source` is the
same split's random-access reader (`tfds.data_source` over array_record
files) for the streaming loader and streamed evaluation.

TensorFlow is imported only inside these functions: the GPU machines (and any
user reading a local folder) need none. Nothing is downloaded: an unprepared
dataset is a clear error naming `data.data_dir` and `data.path`.
"""

from absl import logging
import numpy as np

from moco_jax.core import errors
from moco_jax.data import cache
from moco_jax.data import dataset
from moco_jax.data import decode
from moco_jax.data.dataset import StreamSource


def load_tfds(data_config, split: str, side: int) -> dataset.ImageDataset:
  """The decoded `split` of the prepared tfds dataset `data.name` (cached)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # A mocked builder (tfds.testing.mock_data) lists no splits: the name is taken as is.
  builder, split_name = prepared_builder(data_config, split)
  label_feature = builder.info.features['label']
  class_names = list(label_feature.names)
  key = {'kind': 'tfds', 'name': data_config.name, 'dir': str(builder.data_dir),
         'version': str(builder.info.version), 'split': split_name, 'side': side,
         'cache': cache.CACHE_VERSION}
  path = cache.cache_path(data_config, key, f'tfds-{data_config.name}-{split_name}-{side}px')

  hit = cache.read_cache(path)
  if hit is not None:
    return dataset.ImageDataset(hit[0], hit[1], len(class_names), class_names)
  ds = builder.as_dataset(split=split_name, shuffle_files=False,
                          decoders={'image': tfds.decode.SkipDecoding()})
  labels = []

  def items():  # Iterated in this thread; decoding runs in the pool.
    for index, example in enumerate(tfds.as_numpy(ds)):
      labels.append(int(example['label']))
      yield index, example['image']

  logging.info('Decoding tfds %s:%s at %dx%d with %d threads.', data_config.name, split_name,
               side, side, data_config.num_workers)
  decoded = decode.decode_stream(items(), side, int(data_config.num_workers), decode.decode_value)
  return dataset.decoded_split(decoded, list(range(len(labels))), labels, class_names, side,
                               f'tfds {data_config.name}:{split_name}', path, split_name)


def unknown_dataset_message(tfds, name: str, error: Exception) -> str:
  """'data.name='cifar1O' is not a tfds dataset (did you mean 'cifar10'?)...' in one line."""
  import difflib  # pylint: disable=g-import-not-at-top
  first = (str(error).strip().splitlines() or [type(error).__name__])[0]
  try:
    known = tfds.list_builders(with_community_datasets=False)
  except Exception:  # pylint: disable=broad-except
    known = []
  base = name.split('/')[0].split(':')[0]
  if base in known:  # The dataset exists: its config or version is wrong.
    try:
      configs = [f'{base}/{c.name}' for c in tfds.builder_cls(base).BUILDER_CONFIGS]
    except Exception:  # pylint: disable=broad-except
      configs = []
    close = difflib.get_close_matches(name, configs, n=3, cutoff=0.0) if configs else []
  else:
    close = difflib.get_close_matches(base, known, n=3)
  hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ''
  return (f'data.name={name!r} is not a tfds dataset ({first}). {hint}Fix --config.data.name, '
          'or read a local ImageFolder tree/archive with --config.data.path=...')


class TfdsSource(StreamSource):
  """A prepared tfds split through `tfds.data_source` (random access; array_record files)."""

  def __init__(self, data_source, class_names: list, where: str):
    self.data_source, self.class_names, self.where = data_source, class_names, where

  def __len__(self) -> int:
    return len(self.data_source)

  def label(self, index: int) -> int:
    return int(self.data_source[index]['label'])

  def read(self, index: int):
    return self.data_source[index]['image']


def prepared_builder(data_config, which: str = 'train'):
  """(prepared builder, split name of `which`); the in-memory path's errors otherwise."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = data_config.get('data_dir', '') or None
  try:
    builder = tfds.builder(data_config.name, data_dir=data_dir)
  except ValueError as e:  # One line, not the list of every tfds dataset.
    raise errors.DataError(unknown_dataset_message(tfds, data_config.name, e)) from e
  if not builder.is_prepared():
    raise errors.DataNotFoundError(
        f'tfds dataset data.name={data_config.name!r} is not prepared in '
        f'data.data_dir={data_dir or "(tfds default, ~/tensorflow_datasets)"!r} '
        '(this machine cannot download it). Point --config.data.data_dir at a prepared tfds '
        'directory, or read a local ImageFolder tree/archive with --config.data.path=... '
        '(e.g. ../shared/data/imagenette2-128sq.tgz; a directory for a split too large for '
        'memory).')
  available = list(builder.info.splits.keys())
  field = dataset.split_field(which)
  wanted = data_config[field]
  split = wanted if not available else dataset.pick_split(
      wanted, available, field, f'tfds {data_config.name!r}', allow_fallback=(which == 'eval'))
  return builder, split


def open_tfds_source(data_config, which: str = 'train') -> TfdsSource:
  """`which` split's random-access reader; one line when it has no array_record files."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder, split = prepared_builder(data_config, which)
  try:
    source = builder.as_data_source(split=split,
                                    decoders={'image': tfds.decode.SkipDecoding()})
  except (NotImplementedError, ValueError, FileNotFoundError) as e:
    raise errors.DataError(
        f'tfds {data_config.name}:{split} has no random-access files ({e}). Streaming needs '
        'it prepared as array_record (tfds build --file_format=array_record), or an '
        'ImageFolder directory via --config.data.path=DIR.') from e
  class_names = list(builder.info.features['label'].names)
  return TfdsSource(source, class_names, f'tfds {data_config.name}:{split}')
