"""The tfds source: a TensorFlow Datasets split, downloaded if needed, decoded once or read at random.

`load_tfds` decodes a split into memory (cached); `open_tfds_source` is the
same split's random-access reader (`tfds.data_source` over array_record
files) for the streaming loader and streamed evaluation.

TensorFlow is imported only inside these functions: the GPU machines (and any
user reading a local folder) need none. An unprepared dataset is downloaded
and prepared (`builder.download_and_prepare()`) when `data.download` is True
(the default); offline, or with `data.download=False`, it is one clear error
naming `data.path` (read a local copy instead) within seconds.
"""

import contextlib
import os
import socket
import threading
from typing import Optional

from absl import logging
import numpy as np

from moco_jax.core import errors
from moco_jax.data import cache
from moco_jax.data import dataset
from moco_jax.data import decode
from moco_jax.data import spec as spec_lib
from moco_jax.data.dataset import StreamSource
from moco_jax.data.spec import DataSpec


# Seconds a download socket may wait (connect or read) before tfds' retries give up on it:
# without it a host whose packets are dropped would wait forever.
DOWNLOAD_SOCKET_TIMEOUT_S = 20
# Offline, tfds retries each URL 10 times with exponential backoff (minutes: docs/benchmarks.md,
# "Numbers behind design choices"); resolving and connecting to this host first (tfds' GCS
# mirror) fails in seconds instead.
PROBE_HOST, PROBE_TIMEOUT_S = 'storage.googleapis.com', 5.0
_PROXY_VARIABLES = ('https_proxy', 'HTTPS_PROXY', 'http_proxy', 'HTTP_PROXY', 'all_proxy',
                    'ALL_PROXY')


def offline_reason(host: str = PROBE_HOST, timeout: float = PROBE_TIMEOUT_S) -> Optional[str]:
  """Why this host cannot reach `host` on port 443 (None if it can, or behind a proxy).

  Name resolution runs in a daemon thread so a dead DNS server costs `timeout`
  seconds at most; with a proxy configured, direct resolution says nothing
  and the probe is skipped.
  """
  if any(os.environ.get(v) for v in _PROXY_VARIABLES):
    return None
  result = {}

  def resolve():
    try:
      result['addresses'] = socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
    except OSError as e:
      result['error'] = e

  thread = threading.Thread(target=resolve, daemon=True)
  thread.start()
  thread.join(timeout)
  if 'addresses' not in result:
    return f'cannot resolve {host}: {result.get("error", f"no answer in {timeout:g} s")}'
  family, kind, proto, _, address = result['addresses'][0]
  try:
    with socket.socket(family, kind, proto) as sock:
      sock.settimeout(timeout)
      sock.connect(address)
  except OSError as e:
    return f'cannot connect to {host}:443: {e}'
  return None


def _data_dir_text(data_dir) -> str:
  return data_dir or '(tfds default, ~/tensorflow_datasets)'


def prepared_builder(spec: DataSpec):
  """The tfds builder of `data.name`, downloaded and prepared first when it is not.

  Args:
    spec: the data spec (name, data_dir, download).
  Raises:
    DataError: unknown dataset; DataNotFoundError: not prepared and not
      downloadable (data.download=False, offline, a manual-download dataset),
      naming data.path.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = spec.data_dir or None
  try:
    builder = tfds.builder(spec.name, data_dir=data_dir)
  except ValueError as e:  # DatasetNotFoundError and friends list every dataset: one line here.
    raise errors.DataError(unknown_dataset_message(tfds, spec.name, e)) from e
  if builder.is_prepared():
    return builder
  where = (f'tfds dataset data.name={spec.name!r} is not prepared in '
           f'data.data_dir={_data_dir_text(data_dir)!r}')
  local = ('read a local ImageFolder tree/archive with --config.data.path=... (e.g. '
           '../shared/data/imagenette2-128sq.tgz), or point --config.data.data_dir at a prepared '
           'tfds directory.')
  if not spec.download:
    raise errors.DataNotFoundError(f'{where} and data.download=False: {local}')
  if getattr(builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None):  # imagenet2012 and the like.
    raise errors.DataNotFoundError(
        f'{where}, and tfds cannot download it (its files must be downloaded by hand first; see '
        f'the tfds catalog page of {spec.name!r}): {local}')
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:  # Every process would write the same directory at once.
    raise errors.DataNotFoundError(
        f'{where}, and {jax.process_count()} processes must not download it at once: prepare it '
        f'with one process first (python -c "import tensorflow_datasets as tfds; '
        f'tfds.builder({spec.name!r}, data_dir={data_dir!r}).download_and_prepare()"), '
        f'or {local}')
  offline = offline_reason()
  if offline:
    raise errors.DataNotFoundError(f'{where} and this machine is offline ({offline}), so it '
                                   f'cannot be downloaded: {local}')
  logging.info('%s: downloading and preparing it (data.download=True; '
               '--config.data.download=False refuses instead).', where)
  try:
    with _socket_timeout(DOWNLOAD_SOCKET_TIMEOUT_S):
      builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except  (offline, proxy, manual download)
    first = (' '.join(str(e).split()) or type(e).__name__)[:300]
    raise errors.DataNotFoundError(
        f'{where} and downloading it failed ({type(e).__name__}: {first}). Offline or behind '
        f'a firewall? {local[0].upper()}{local[1:]}') from e
  return builder


@contextlib.contextmanager
def _socket_timeout(seconds: float):
  """socket.setdefaulttimeout for the block (tfds' requests sessions set none of their own)."""
  previous = socket.getdefaulttimeout()
  socket.setdefaulttimeout(seconds)
  try:
    yield
  finally:
    socket.setdefaulttimeout(previous)


def load_tfds(spec: DataSpec, split: str) -> dataset.ImageDataset:
  """The decoded `split` of the tfds dataset `data.name` (downloaded if needed; cached)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  side = spec.side
  builder, split_name = builder_and_split(spec, split)
  label_feature = builder.info.features['label']
  class_names = list(label_feature.names)
  key = {'kind': 'tfds', 'name': spec.name, 'dir': str(builder.data_dir),
         'version': str(builder.info.version), 'split': split_name, 'side': side,
         'cache': cache.CACHE_VERSION}
  path = cache.cache_path(spec.cache_dir, key, f'tfds-{spec.name}-{split_name}-{side}px')

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

  logging.info('Decoding tfds %s:%s at %dx%d with %d threads.', spec.name, split_name,
               side, side, spec.num_workers)
  decoded = decode.decode_stream(items(), side, spec.num_workers, decode.decode_value)
  return dataset.decoded_split(decoded, list(range(len(labels))), labels, class_names, side,
                               f'tfds {spec.name}:{split_name}', path, split_name)


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


class TfdsReader(StreamSource):
  """A prepared tfds split through `tfds.data_source` (random access; array_record files)."""

  def __init__(self, data_source, class_names: list, where: str):
    self.data_source, self.class_names, self.where = data_source, class_names, where

  def __len__(self) -> int:
    return len(self.data_source)

  def label(self, index: int) -> int:
    return int(self.data_source[index]['label'])

  def read(self, index: int):
    return self.data_source[index]['image']


def builder_and_split(spec: DataSpec, which: str = 'train'):
  """(prepared builder, split name of `which`: 'train' or 'eval', the latter with fallbacks)."""
  builder = prepared_builder(spec)
  split = dataset.pick_split(spec.split_name(which), split_counts(builder),
                             spec_lib.split_field(which), f'tfds {spec.name!r}',
                             allow_fallback=(which == 'eval'))
  return builder, split


def split_counts(builder) -> dict:
  """{split name: number of examples} of a prepared builder (from its metadata: no reading)."""
  return {name: int(info.num_examples) for name, info in builder.info.splits.items()}


def split_count(spec: DataSpec, which: str = 'train') -> int:
  builder, split = builder_and_split(spec, which)
  return split_counts(builder)[split]


def open_tfds_reader(spec: DataSpec, which: str = 'train') -> TfdsReader:
  """`which` split's random-access reader; one line when it has no array_record files."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder, split = builder_and_split(spec, which)
  try:
    source = builder.as_data_source(split=split,
                                    decoders={'image': tfds.decode.SkipDecoding()})
  except (NotImplementedError, ValueError, FileNotFoundError) as e:
    raise errors.DataError(
        f'tfds {spec.name}:{split} has no random-access files ({e}). Streaming needs '
        'it prepared as array_record (tfds build --file_format=array_record), or an '
        'ImageFolder directory via --config.data.path=DIR.') from e
  class_names = list(builder.info.features['label'].names)
  return TfdsReader(source, class_names, f'tfds {spec.name}:{split}')
