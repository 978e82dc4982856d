"""Writes tests/data/torchvision_resized_crop.npz: torchvision's RandomResizedCrop pixels.

tests/test_device_crops.py compares the device crop of streamed canvases
(`image_ops.canvas_resized_crop`) with these, read without torch. The images
are drawn here from a fixed seed (photo-like: a smooth field plus grain, no
data file); for each, torchvision's `RandomResizedCrop(size, scale=(0.2, 1))`
draws boxes (`get_params`, torch seed 0) and cuts them from the PIL image with
`F.resized_crop(..., BILINEAR, antialias=True)`, its PIL path (crop, then
resize), at an output side that downsamples and one that upsamples.

Regenerate (torch and torchvision in their own venv, never in requirements.txt):

  python3 -m venv /work/.peer_venv
  /work/.peer_venv/bin/pip install torch torchvision pillow==13.0.0
  /work/.peer_venv/bin/python tools/make_resized_crop_golden.py
"""

import os

import numpy as np
from PIL import Image
import torch
import torchvision
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F
from torchvision.transforms import RandomResizedCrop

_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests',
                    'data', 'torchvision_resized_crop.npz')
SIZES = ((75, 100), (100, 67), (33, 21))  # (height, width)
OUTPUTS = (16, 48)
CROPS = 8  # Per image and output side.
CANVAS = 128


def _photo(rng, width, height) -> np.ndarray:
  small = rng.integers(0, 256, (max(2, height // 12), max(2, width // 12), 3), dtype=np.uint8)
  base = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), np.int16)
  grain = rng.integers(-12, 13, (height, width, 3))
  return np.clip(base + grain, 0, 255).astype(np.uint8)


def main():
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  canvases = np.zeros((len(SIZES), CANVAS, CANVAS, 3), np.uint8)
  arrays = {'sizes': np.array(SIZES, np.int32)}
  for size in OUTPUTS:
    boxes, crops, which = [], [], []
    arrays[f'boxes_{size}'], arrays[f'crops_{size}'] = boxes, crops
    arrays[f'image_{size}'] = which
    for i, (height, width) in enumerate(SIZES):
      if size == OUTPUTS[0]:
        canvases[i, :height, :width] = _photo(rng, width, height)
      image = Image.fromarray(canvases[i, :height, :width])
      for _ in range(CROPS):
        top, left, h, w = RandomResizedCrop.get_params(image, scale=(0.2, 1.0),
                                                       ratio=(3 / 4, 4 / 3))
        out = F.resized_crop(image, top, left, h, w, [size, size],
                             InterpolationMode.BILINEAR, antialias=True)
        boxes.append((top, left, h, w))
        crops.append(np.asarray(out))
        which.append(i)
    arrays[f'boxes_{size}'] = np.array(boxes, np.int32)
    arrays[f'crops_{size}'] = np.stack(crops)
    arrays[f'image_{size}'] = np.array(which, np.int32)
  arrays['canvases'] = canvases
  versions = f'torch {torch.__version__}, torchvision {torchvision.__version__}'
  np.savez_compressed(_OUT, versions=versions, **arrays)
  print(f'wrote {_OUT} ({os.path.getsize(_OUT) / 1024:.0f} KiB; {versions})')


if __name__ == '__main__':
  main()
