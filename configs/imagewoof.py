"""MoCo v2, ResNet-18 at 128 px on Imagewoof (10 dog breeds of ImageNet, 9,025 train images).

  # From the official archive (imagewoof2-160.tgz or imagewoof2-320.tgz, fast.ai):
  python main.py --config=configs/imagewoof.py --workdir=/tmp/moco_imagewoof \
      --config.data.path=/path/to/imagewoof2-320.tgz

tensorflow-datasets has no `imagewoof` builder (4.9.10 has `imagenette` and
`imagewang`, the latter Imagenette and Imagewoof mixed with unlabelled images),
so this config reads the ImageFolder archive (train/ and val/, 9,025 / 3,929
images) and stops at once, saying so, when --config.data.path is missing. A
prepared tfds-format copy (a custom builder named e.g. `imagewoof/320px`) works
with `--config.data.source=tfds --config.data.name=imagewoof/320px
--config.data.data_dir=...`.

The Imagenette recipe (`configs/imagenette.py`: aug+, MLP head, T = 0.2,
queue 4096, m = 0.99, SGD lr 0.06 x batch / 256, wd 5e-4, cosine, batch 256,
200 epochs) on the harder sibling: all ten classes are dogs, so colour and
background separate them far less than Imagenette's, and kNN / linear accuracy
land well below Imagenette's. Expected: not yet measured here (no GPU run; see
docs/results.md). The Imagenette/Imagewoof write-up's own recipe (Adam, 25-d
keys, T = 0.05) is `configs/writeup.py:imagewoof`.
"""

from configs import imagenette


def get_config():
  config = imagenette.get_config()
  config.data.source = 'folder'  # Needs --config.data.path (see above).
  config.data.name = 'imagewoof/320px'  # Only read with --config.data.source=tfds.
  config.data.train_split = 'train'
  config.data.eval_split = 'val'
  return config
