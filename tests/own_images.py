"""Generated image collections of the kinds `moco_jax.data.listed` reads (written at test time)."""

import os

import numpy as np
from PIL import Image


def _image(rng, tint: int, mode: str = 'RGB') -> Image.Image:
  height, width = int(rng.integers(18, 30)), int(rng.integers(18, 30))
  pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  pixels[..., tint % 3] = 220
  image = Image.fromarray(pixels)
  return image.convert(mode) if mode != 'RGB' else image


def flat_folder(root, count: int = 40, seed: int = 0, mode: str = 'RGB') -> list:
  """ROOT/img_NNN.png, no class folders; returns the sorted names."""
  os.makedirs(root, exist_ok=True)
  rng = np.random.default_rng(seed)
  names = []
  for i in range(count):
    name = f'img_{i:03d}.png'
    _image(rng, i, mode).save(os.path.join(root, name))
    names.append(name)
  return sorted(names)


def nested_folder(root, count: int = 40, seed: int = 1) -> list:
  """Images at depths 1-3 (ROOT/a/x.png, ROOT/a/b/y.jpg, ROOT/c/d/e/z.png); sorted names."""
  rng = np.random.default_rng(seed)
  dirs = ['a', 'a/b', 'c/d/e', 'f']
  names = []
  for i in range(count):
    directory = dirs[i % len(dirs)]
    os.makedirs(os.path.join(root, directory), exist_ok=True)
    name = f'{directory}/s{i:03d}.{"jpg" if i % 3 == 0 else "png"}'
    _image(rng, i).save(os.path.join(root, name))
    names.append(name)
  with open(os.path.join(root, 'a', 'notes.txt'), 'w') as f:
    f.write('not an image')
  return sorted(names)


def csv_list(root, count: int = 40, labels: bool = True, seed: int = 2,
             name: str = 'list.csv') -> tuple:
  """ROOT/images/*.png and ROOT/<name> listing them (header path[,label]); (path, rows)."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, 'images'), exist_ok=True)
  rows = []
  for i in range(count):
    rel = f'images/p{i:03d}.png'
    _image(rng, i % 3).save(os.path.join(root, rel))
    rows.append((rel, ['cat', 'dog', 'eel'][i % 3]))
  path = os.path.join(root, name)
  with open(path, 'w') as f:
    if name.endswith('.csv'):
      f.write('path,label\n' if labels else 'path\n')
      f.writelines(f'{p},{c}\n' if labels else f'{p}\n' for p, c in rows)
    else:
      f.writelines(f'{p}\t{c}\n' if labels else f'{p}\n' for p, c in rows)
  return path, rows


KINDS = ('flat', 'nested', 'csv_labels', 'csv_no_labels', 'gray_png', 'gray_png_1', 'tiff16_4',
         'npy13')
# Config overrides a kind needs: its channels, and normalisation from its own images.
OVERRIDES = {
    'nested': {'data.labels': 'none'},  # Folders inside folders: auto would read a tree.
    'gray_png_1': {'data.channels': 1, 'aug.mean': 'auto', 'aug.std': 'auto'},
    'tiff16_4': {'data.channels': 4, 'aug.mean': 'auto', 'aug.std': 'auto'},
    'npy13': {'data.channels': 13, 'aug.mean': 'auto', 'aug.std': 'auto'},
}


def flags(kind: str) -> list:
  """OVERRIDES[kind] as main.py flags."""
  return [f'--config.{k}={v}' for k, v in OVERRIDES.get(kind, {}).items()]


def apply(kind: str, config) -> None:
  """OVERRIDES[kind] set on `config` (normalisation still 'auto': resolve it)."""
  for key, value in OVERRIDES.get(kind, {}).items():
    section, field = key.split('.')
    with config.ignore_type():
      config[section][field] = value


def tiff16_folder(root, count: int, channels: int = 4, seed: int = 3) -> None:
  """ROOT/t_NNN.tif: 16-bit images with `channels` samples per pixel, varied sizes."""
  import tifffile  # pylint: disable=g-import-not-at-top
  os.makedirs(root, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i in range(count):
    height, width = int(rng.integers(18, 30)), int(rng.integers(18, 30))
    pixels = rng.integers(0, 65536, (height, width, channels), dtype=np.uint16)
    pixels[..., i % channels] = 60000
    tifffile.imwrite(os.path.join(root, f't_{i:03d}.tif'), pixels, photometric='minisblack',
                     planarconfig='contig')


def npy_folder(root, count: int, channels: int = 13, seed: int = 4) -> None:
  """ROOT/sub/a_NNN.npy: float32 [H, W, channels] arrays in [0, 1]."""
  os.makedirs(os.path.join(root, 'sub'), exist_ok=True)
  rng = np.random.default_rng(seed)
  for i in range(count):
    height, width = int(rng.integers(18, 30)), int(rng.integers(18, 30))
    array = rng.random((height, width, channels)).astype(np.float32)
    array[..., i % channels] = 1.0
    np.save(os.path.join(root, 'sub', f'a_{i:03d}.npy'), array)


def make(kind: str, root, count: int = 32) -> str:
  """Writes a collection of `kind` under `root`; returns what data.path should be."""
  root = str(root)
  if kind == 'flat':
    flat_folder(root, count)
    return root
  if kind == 'nested':
    nested_folder(root, count)
    return root
  if kind == 'csv_labels':
    return csv_list(root, count, labels=True)[0]
  if kind == 'csv_no_labels':
    return csv_list(root, count, labels=False, name='list.txt')[0]
  if kind in ('gray_png', 'gray_png_1'):
    flat_folder(root, count, mode='L')
    return root
  if kind == 'tiff16_4':
    tiff16_folder(root, count)
    return root
  if kind == 'npy13':
    npy_folder(root, count)
    return root
  raise ValueError(kind)
