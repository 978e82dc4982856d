"""The kinds of data, one `Source` each, and the one function that opens the configured one.

`from_config(config)` is where the data layer begins: `config.data` becomes a
`DataSpec` (`moco_jax.data.spec`) and the spec the `Source` of its kind. Every
caller (pretraining, each evaluation) holds that source and asks it for a
split; which of the two forms a split gets, decoded into memory or streamed
through its reader, is `moco_jax.data.streaming.open_split`'s decision.

The host only decodes (and caches) images at a fixed square side S
(`DataSpec.side`: the shorter side resized to S, bilinear and antialiased, the
centre S x S square kept, `moco_jax.data.decode.fit_square`); random crops,
colour jitter, blur and flips run on the accelerator
(`moco_jax.augmentation.augment`). Decoded splits are cached
(`moco_jax.data.cache`), so a second run skips decoding; every process loads
the whole split and takes its own slice of each batch.

Kinds:
  * folder (`moco_jax.data.folder`, `folder_reader`): `data.path` names an
    ImageFolder tree ROOT/{train,val}/<class>/*.
  * archive (`moco_jax.data.folder`): a .tar/.tgz/.tar.gz of such a tree,
    read as is; tar is sequential, so it is never streamed.
  * packed (`moco_jax.data.packed`, written by `moco_jax.data.pack`): a
    directory of ArrayRecord shards and a manifest, read at random.
  * listed (`moco_jax.data.listed`): your own images, a folder of images at
    any depth without class folders (or an archive of one), or a .csv/.txt
    list of image paths, with labels per `data.labels` and any channel count.
  * tfds (`moco_jax.data.tfds_source`): `data.name` in `data.data_dir`,
    downloaded and prepared first if it is not (`data.download`).
  * synthetic (`moco_jax.data.synthetic`): random images, for benchmarks and tests.
"""

import os

from moco_jax.core import errors
from moco_jax.data import folder
from moco_jax.data import folder_reader
from moco_jax.data import listed
from moco_jax.data import packed
from moco_jax.data import spec as spec_lib
from moco_jax.data import synthetic
from moco_jax.data import tfds_source
from moco_jax.data.dataset import ImageDataset, Source, StreamSource
from moco_jax.data.spec import DataSpec


class FolderSource(Source):
  """An ImageFolder directory: decoded whole, or streamed from its cached file index."""

  def load(self, split: str) -> ImageDataset:
    return folder.load_folder(self.spec, split)

  def open(self, split: str) -> StreamSource:
    return folder_reader.open_folder_reader(self.spec, split)

  def describe(self) -> str:
    return f'the ImageFolder directory {self.spec.path}'


class ArchiveSource(Source):
  """A tar archive of an ImageFolder tree: decoded in the pass that lists it, never streamed."""
  streamable = False

  def count(self, split: str) -> int:
    if split != 'train':
      raise ValueError('Only the train split of an archive is counted before decoding it.')
    return folder.archive_train_count(self.spec)

  def load(self, split: str) -> ImageDataset:
    return folder.load_folder(self.spec, split)

  def open(self, split: str) -> StreamSource:
    raise errors.DataError(f'data.path={self.spec.path!r} is an archive: archives cannot be '
                           'streamed; unpack it into a directory and point data.path at it.')

  def describe(self) -> str:
    return f'the archive {self.spec.path}'


class PackedSource(Source):
  """ArrayRecord shards written by --mode=pack: read at random, decoded or streamed."""

  def load(self, split: str) -> ImageDataset:
    return packed.load_packed(self.spec, split)

  def open(self, split: str) -> StreamSource:
    return packed.open_packed_reader(self.spec, split)

  def describe(self) -> str:
    return f'the packed directory {self.spec.path}'


class ListedSource(Source):
  """Your own images: a folder without class folders, an archive of one, or a .csv/.txt list."""

  def __init__(self, spec: DataSpec):
    super().__init__(spec)
    # Archives are sequential: decoded into memory, never streamed (as the archive kind).
    self.streamable = not (os.path.isfile(spec.path) and spec_lib.is_archive_name(spec.path))

  def count(self, split: str) -> int:
    return listed.count(self.spec, split)

  def load(self, split: str) -> ImageDataset:
    return listed.load_listed(self.spec, split)

  def open(self, split: str) -> StreamSource:
    if not self.streamable:
      raise errors.DataError(f'data.path={self.spec.path!r} is an archive: archives cannot be '
                             'streamed; unpack it into a directory and point data.path at it.')
    return listed.open_listed_reader(self.spec, split)

  def describe(self) -> str:
    what = {'none': 'unlabeled', 'csv': 'labelled by its list'}.get(self.spec.labels, '')
    return f'your images at {self.spec.path}' + (f' ({what})' if what else '')


class TfdsSource(Source):
  """A tfds dataset (downloaded and prepared when it can be), decoded or read at random."""

  def count(self, split: str) -> int:
    return tfds_source.split_count(self.spec, split)

  def load(self, split: str) -> ImageDataset:
    return tfds_source.load_tfds(self.spec, split)

  def open(self, split: str) -> StreamSource:
    return tfds_source.open_tfds_reader(self.spec, split)

  def describe(self) -> str:
    return f'tfds {self.spec.name}'


class SyntheticSource(Source):
  """Random images generated in memory (never streamed: there is nothing to read)."""
  streamable = False

  def count(self, split: str) -> int:
    return self.spec.synthetic_examples

  def load(self, split: str) -> ImageDataset:
    spec_lib.split_field(split)  # 'train' or 'eval' only, as every other kind.
    return synthetic.load_synthetic(self.spec, split)

  def open(self, split: str) -> StreamSource:
    return synthetic.SyntheticReader(self.spec, split)

  def describe(self) -> str:
    return (f'{self.spec.synthetic_examples} synthetic images of '
            f'{self.spec.synthetic_classes} classes')


KINDS = {'folder': FolderSource, 'archive': ArchiveSource, 'packed': PackedSource,
         'listed': ListedSource, 'tfds': TfdsSource,
         'synthetic': SyntheticSource}


def open_source(spec: DataSpec) -> Source:
  """The `Source` of `spec.kind`."""
  return KINDS[spec.kind](spec)


def from_config(config) -> Source:
  """`config.data` resolved once into its spec and opened as a source.

  Raises ConfigError naming the field when `config.data` names no kind of data.
  """
  return open_source(spec_lib.from_config(config.data))
