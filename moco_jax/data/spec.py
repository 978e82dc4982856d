"""`config.data` resolved once, at the edge, into a frozen `DataSpec`.

Everything below the edge (sources, caches, planning, loaders) reads the spec,
never the raw config: which kind of data it is, where it lives (an absolute
path), which splits, the decoded side, the cache directory, the memory budget
and the workers are each decided here, once. This is big_vision's
`ds_core.get` made typed: a wrong value fails in one place with one message,
and two readers cannot disagree about what "data.path is an archive" means.
"""

import dataclasses
import json
import os

from moco_jax.core import errors

ARCHIVE_SUFFIXES = ('.tar', '.tgz', '.tar.gz')
KINDS = ('folder', 'archive', 'packed', 'listed', 'tfds', 'synthetic')
LIST_SUFFIXES = ('.csv', '.tsv', '.txt')
LABEL_MODES = ('auto', 'folders', 'csv', 'none')
PACKED_MANIFEST = 'manifest.json'  # A directory holding one is packed (`moco_jax.data.pack`).
SOURCES = ('tfds', 'folder', 'synthetic')  # Every `data.source` (data.path set means a folder).
# Splits tried, in order, when the configured eval split is missing:
# ImageFolder archives use val/ (Imagenette) or test/ (CIFAR-10-images).
EVAL_FALLBACKS = ('val', 'validation', 'test')


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What the data is and how it is read; built by `from_config` only.

  Attributes:
    kind: 'folder' (an ImageFolder directory), 'archive' (a tar of one),
      'packed' (ArrayRecord shards written by --mode=pack), 'listed' (your own
      images: a folder without class folders, an archive of one, or a
      .csv/.tsv/.txt list), 'tfds' or 'synthetic'.
    labels, val_fraction, channels: where labels come from, the held-out
      fraction without an eval split, and the channels kept (listed data).
    path: `data.path`, absolute ('' for tfds and synthetic data).
    train_split, eval_split: the split names asked for (the eval split falls
      back to EVAL_FALLBACKS when absent).
    side: the square side S images are decoded to and cached at.
    image_size: the network's input size (the crop's output).
    memory_budget: bytes a decoded split may take in host memory before it is
      streamed; `memory_budget_text` says where the number came from.
  """
  kind: str
  path: str = ''
  name: str = ''
  data_dir: str = ''
  download: bool = True
  train_split: str = 'train'
  eval_split: str = 'val'
  image_size: int = 128
  side: int = 128
  cache_dir: str = ''
  memory_budget: int = 0
  memory_budget_text: str = ''
  num_workers: int = 4
  stream_processes: int = -1
  on_device: bool = False
  stream_crops: str = 'device'
  canvas_side: int = 512
  decoder: str = 'pillow'
  pack_side: int = 256
  labels: str = 'auto'
  val_fraction: float = 0.0
  channels: int = 3
  synthetic_examples: int = 0
  synthetic_classes: int = 0

  def split_name(self, split: str) -> str:
    """The configured name of 'train' or 'eval'."""
    return getattr(self, split_field(split))

  def with_(self, **changes) -> 'DataSpec':
    return dataclasses.replace(self, **changes)


def split_field(split: str) -> str:
  """The config field naming the split: 'train' -> train_split, 'eval' -> eval_split."""
  if split not in ('train', 'eval'):
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}.")
  return f'{split}_split'


def is_archive_name(path: str) -> bool:
  return path.lower().endswith(ARCHIVE_SUFFIXES)


def decoded_side(data_config) -> int:
  """S: `data.cache_size` when > 0, else round(image_size x data.cache_ratio)."""
  cache_size = int(data_config.get('cache_size', -1))
  if cache_size > 0:
    return cache_size
  return int(round(int(data_config.image_size) * float(data_config.get('cache_ratio', 1.0))))


def host_memory_bytes() -> int:
  """MemTotal of this host (Linux /proc/meminfo; sysconf elsewhere)."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemTotal:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return int(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))


def memory_budget(data_config) -> tuple[int, str]:
  """(bytes, description) of `data.max_in_memory_gb`; -1 means 25% of host RAM."""
  gb = float(data_config.get('max_in_memory_gb', -1))
  if gb < 0:
    total = host_memory_bytes()
    return total // 4, f'25% of this host\'s {total / 2**30:.1f} GiB RAM (data.max_in_memory_gb=-1)'
  return int(gb * 2**30), f'data.max_in_memory_gb={gb:g}'


def default_cache_dir(data_config) -> str:
  path = data_config.get('cache_dir', '') or os.path.join('~', '.cache', 'moco_jax')
  return os.path.abspath(os.path.expanduser(path))


def labels_mode(data_config) -> str:
  """`data.labels`, checked: auto | folders | csv | none."""
  mode = data_config.get('labels', 'auto')
  if mode not in LABEL_MODES:
    raise errors.ConfigError(f'data.labels={mode!r} is not one of {" | ".join(LABEL_MODES)}: '
                             'set --config.data.labels=folders (class folders), csv (a list\'s '
                             'label column), none (unlabeled) or auto.')
  return mode


def is_list_file(path: str) -> bool:
  return path.lower().endswith(LIST_SUFFIXES)


def _subdirs(path: str) -> list:
  try:
    with os.scandir(path) as entries:
      return [e.path for e in entries if e.is_dir() and not e.name.startswith('.')]
  except OSError:
    return []


def _has_folder_layout(path: str) -> bool:
  """Whether a directory may be an ImageFolder tree: folders inside folders (cheap: two levels).

  ROOT/<split>/<class>/ (or one top folder above it) always has them; a flat
  folder, or one level of folders, cannot be a tree. Deeper unlabeled trees
  need data.labels=none (the folder source's error says so), so a typo in
  data.train_split is never read as 'every image, unlabeled'.
  """
  return any(_subdirs(sub) for sub in _subdirs(path))


def _is_listed(data_config, path: str) -> bool:
  """Whether `data.path` holds your own images (a list, or images without class folders)."""
  mode = labels_mode(data_config)
  raw = data_config.get('path', '')
  if is_list_file(path):
    if mode == 'folders':
      raise errors.ConfigError(
          f'data.labels=folders needs class folders, but data.path={raw!r} is a list file: set '
          '--config.data.labels=csv (its label column) or none.')
    return True
  if mode == 'csv':
    raise errors.ConfigError(
        f'data.labels=csv needs a .csv/.tsv/.txt list, but data.path={raw!r} is not one: set '
        '--config.data.path to the list, or --config.data.labels=folders or none.')
  if mode == 'none':
    return True
  if mode == 'folders' or not os.path.isdir(path):
    return False  # An ImageFolder tree or archive (missing paths get the folder's message).
  return not _has_folder_layout(path)


def _kind(data_config) -> tuple[str, str]:
  """(kind, absolute path): a set `data.path` is a folder, archive, packed or listed data."""
  raw = data_config.get('path', '') or ''
  channels = int(data_config.get('channels', 3))
  if raw:
    path = os.path.normpath(os.path.abspath(os.path.expanduser(raw)))
    if os.path.isfile(os.path.join(path, PACKED_MANIFEST)):
      return 'packed', path
    if _is_listed(data_config, path):
      return 'listed', path
    if channels != 3:
      raise errors.ConfigError(
          f'data.channels={channels} is read from folders of your own images and lists '
          '(moco_jax/data/listed.py); an ImageFolder tree is decoded as RGB: set '
          '--config.data.labels=none (unlabeled) or list the images with their labels in a '
          '.csv, or set --config.data.channels=3.')
    if os.path.isfile(path) and is_archive_name(path):
      return 'archive', path
    return 'folder', path
  if channels != 3:
    raise errors.ConfigError(f'data.channels={channels} needs data.path (a folder or list of '
                             'your images); tfds and synthetic data are RGB: set '
                             '--config.data.channels=3.')
  source = data_config.get('source', 'tfds')
  if source not in SOURCES:
    raise errors.ConfigError(f'data.source={source!r} is not one of {" | ".join(SOURCES)}.')
  if source == 'folder':
    raise errors.ConfigError('data.source=folder needs data.path: set --config.data.path to an '
                             'ImageFolder directory ROOT/{train,val}/<class>/* or a .tar/.tgz of '
                             'one.')
  return source, ''


DEFAULT_CANVAS = 512  # ImageNet's photos (at most 500 px a side) fit whole.


def canvas_side(configured: int, kind: str, path: str) -> int:
  """`data.canvas_side`, or for 0 (auto): 1.5 x a packed copy's pack side (a multiple of 32),
  else DEFAULT_CANVAS.

  A packed image's short side is at most its pack side, so 1.5 x holds 3:2
  and 4:3 photos whole (ImageNet's 500x333 packs to 384x256) while the canvas
  the host fills and hands over is 44% smaller than 512's; wider ones are
  reduced on the host and the run says so once.
  """
  if configured > 0:
    return configured
  if kind == 'packed':
    try:
      with open(os.path.join(path, PACKED_MANIFEST)) as f:
        side = int(json.load(f)['pack_side'])
      return -(-side * 3 // 64) * 32  # ceil(1.5 x side / 32) x 32.
    except (OSError, ValueError, KeyError, TypeError):
      pass  # The packed reader names a bad manifest when it opens it.
  return DEFAULT_CANVAS


def from_config(data_config) -> DataSpec:
  """The one place that reads `config.data`: returns its `DataSpec`."""
  kind, path = _kind(data_config)
  budget, budget_text = memory_budget(data_config)
  synthetic = kind == 'synthetic'
  return DataSpec(
      kind=kind, path=path,
      name=str(data_config.get('name', '')) if kind == 'tfds' else '',
      data_dir=str(data_config.get('data_dir', '') or '') if kind == 'tfds' else '',
      download=bool(data_config.get('download', True)),
      train_split=str(data_config.get('train_split', 'train')),
      eval_split=str(data_config.get('eval_split', 'val')),
      image_size=int(data_config.image_size), side=decoded_side(data_config),
      cache_dir=default_cache_dir(data_config),
      memory_budget=budget, memory_budget_text=budget_text,
      num_workers=int(data_config.get('num_workers', 4)),
      stream_processes=int(data_config.get('stream_processes', -1)),
      on_device=bool(data_config.get('on_device', False)),
      stream_crops=str(data_config.get('stream_crops', 'device')),
      canvas_side=canvas_side(int(data_config.get('canvas_side', 0)), kind, path),
      decoder=str(data_config.get('decoder', 'pillow')),
      pack_side=int(data_config.get('pack_side', 256)),
      labels=labels_mode(data_config), val_fraction=float(data_config.get('val_fraction', 0.0)),
      channels=int(data_config.get('channels', 3)),
      synthetic_examples=int(data_config.get('synthetic_examples', 0)) if synthetic else 0,
      synthetic_classes=int(data_config.get('synthetic_classes', 0)) if synthetic else 0)


def identity(spec: DataSpec) -> dict:
  """What names the data, without reading it: the resume guard and config.json compare it.

  Changing one of these fields gives the run other images (or another order of
  them); everything else in the spec (workers, cache dir, budget) only
  changes how they are read.
  """
  out = {'kind': 'folder' if spec.kind in ('archive', 'packed') else spec.kind}
  if spec.path:
    out['path'] = spec.path
  if spec.kind == 'listed':
    out.update(labels=spec.labels, val_fraction=spec.val_fraction, channels=spec.channels)
  if spec.kind == 'tfds':
    out.update(name=spec.name, data_dir=spec.data_dir)
  if spec.kind == 'synthetic':
    out.update(examples=spec.synthetic_examples, classes=spec.synthetic_classes)
  return out
