"""Writes the golden files of tests/test_equivalence.py from the PyTorch references.

Four files in tests/data/ (2.3 MB in all), read by the tests without torch:
  official_moco_step.npz     three training steps of facebookresearch/moco's
                             `moco/builder.py` + torch.optim.SGD on fixed views.
  torchvision_ops.npz        torchvision.transforms.v2.functional ops on real
                             images with fixed parameters (the float tensor path).
  torchvision_crop_boxes.npz 20,000 RandomResizedCrop.get_params boxes for a
                             square and a non-square image.
  detectron2_convert.npz     what the official detection/convert-pretrain-to-detectron2.py
                             (run unedited, as a script) makes of our torchvision
                             exports of two tiny checkpoints (below).

Regenerate (torch and torchvision live in their own venv, never in requirements.txt;
the official code is exported into the git-ignored .peer/ and never committed):

  python3 -m venv /work/torchvenv
  /work/torchvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 numpy pillow
  # `fetch github:facebookresearch/moco` (the search tool) gives GITDIR; then
  mkdir -p .peer/moco && git --git-dir=GITDIR archive 3b42c2a | tar -x -C .peer/moco
  /work/torchvenv/bin/python tools/make_goldens.py --moco_repo=.peer/moco \
      --images=../shared/data/imagenette2-128sq.tgz

The detectron2 golden (tests/test_transfer.py) needs torch only (no torchvision,
no JAX in that venv). Its inputs are our own `--mode=export` files of two
2-step checkpoints, made with the project's venv (the ResNet-50 one exercises
bn3; the width keeps the file small):

  for a in "resnet18 4" "resnet50 2"; do set -- $a; W=/tmp/transfer_goldens/$1
    .venv/bin/python main.py --config=configs/tiny.py --workdir=$W --config.model.name=$1 \
        --config.model.width=$2 --config.model.stem=imagenet --config.num_train_steps=2 \
        --config.batch_size=16 --config.moco.queue_size=32
    .venv/bin/python main.py --mode=export --workdir=$W; done
  /work/venvs/torch/bin/python tools/make_goldens.py --only=detectron2 \
      --moco_repo=.peer/moco \
      --detectron2_exports=/tmp/transfer_goldens/resnet18,/tmp/transfer_goldens/resnet50
  # .peer/moco: `git archive 7397dfe` of facebookresearch/moco (the converter is unchanged
  # since 3b42c2a).

Each export is wrapped as main_moco.py saves a checkpoint ({'state_dict':
{'module.encoder_q.<name>': tensor, 'module.encoder_k.<name>': tensor,
'module.queue': ..., 'module.queue_ptr': ...}}), so the converter also has
to skip what is not the query encoder. The golden stores the export (the
test's input), the converter's key set with shapes and dtypes, its pickle's
other fields, and the values of one tensor per renaming rule.

The script is deterministic (fixed seeds, one CPU thread): rerunning it with the
same torch/torchvision versions rewrites identical arrays.

The official step, and what is changed in it to run in one process (all by
monkeypatching here; builder.py itself is loaded unedited):
  * `concat_all_gather` is the identity (world size 1), and
    `_batch_shuffle_ddp` / `_batch_unshuffle_ddp` return the batch unpermuted:
    with one process the key encoder sees the whole batch, as ours with
    bn_mode='local' on one device.
  * `_dequeue_and_enqueue` writes key i to slot (ptr + i) mod K instead of
    asserting K % batch == 0: K = 40 with batch 16 wraps inside step 3. When K
    is a multiple of the batch it is the official code's update exactly.
  * `torch.Tensor.cuda` is the identity (forward() puts its labels on the GPU).
  * The encoder is torchvision's ResNet (BasicBlock, [2, 2, 2, 2]: ResNet-18's
    depth, layout and 7x7/maxpool stem) built by a subclass with `width` = 4
    channels in the first stage instead of 64 (4-8-16-32, 47,596 parameters
    with the MLP head), stored in float32, so the file stays near 1.3 MB
    (width 8 would need about 4 MB); the modules, names, forward and
    initialisation are torchvision's.
The views are fixed uint8 images (torchvision RandomResizedCrop(32) + flip of
Imagenette images, images 16t..16t+15 at step t), fed to both sides as
u8 / 64 - 2; the official SGD has lr 0.03, momentum 0.9, weight decay 1e-4;
MoCo m = 0.99, T = 0.2, K = 40, dim 16, batch 16.
The official code moves the key encoder at the START of each forward; ours at
the END of each step. So after official step t the recorded key parameters
are those that the official step t + 1 will use, i.e. after one more
`_momentum_update_key_encoder()` (run on a deep copy): what ours holds after t.
The same three steps run in float64 from the same float32 start; the per-tensor
max |float32 - float64| is stored as the reference's own rounding noise.
"""

import argparse
import copy
import functools
import importlib.util
import io
import os
import sys
import tarfile

import numpy as np
import torch
from torch import nn
try:  # The detectron2 golden needs torch alone; the others need torchvision too.
  import torchvision
  from torchvision.models import resnet as tv_resnet
  from torchvision.transforms import RandomResizedCrop
  import torchvision.transforms.v2.functional as F
except (ImportError, RuntimeError) as _error:  # Absent, or built for another torch.
  torchvision = tv_resnet = RandomResizedCrop = F = None
  TORCHVISION_ERROR = _error

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(_ROOT, 'tests', 'data')

# The official step's setting (the test reads these back from the file).
STEP = dict(seed=0, width=4, stem='imagenet', image_size=32, batch=16, dim=16, queue_size=40, steps=3,
            lr=0.03, sgd_momentum=0.9, weight_decay=1e-4, moco_momentum=0.99, temperature=0.2)
# The views are uint8 images; both sides feed them as u8 / 64 - 2, which is exact
# in float32, so both networks see bit-identical inputs.
VIEW_SCALE, VIEW_SHIFT = 64.0, 2.0

# Fixed parameters of the colour / blur / geometry ops.
BRIGHTNESS = (0.5, 1.4)
CONTRAST = (0.5, 1.4)
SATURATION = (0.0, 0.6, 1.4)
HUE = (-0.5, -0.1, 0.25, 0.5)
BLUR = ((7, 0.1), (7, 1.0), (7, 2.0), (3, 1.0))  # (kernel size, sigma)
# (source side, top, left, height, width) -> a 32 px output.
CROPS = ((64, 5, 10, 40, 50), (64, 20, 12, 20, 24), (32, 4, 6, 20, 16), (32, 0, 0, 32, 32))
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# RandomResizedCrop.get_params draws: (height, width) of the image.
CROP_IMAGES = ((128, 128), (100, 160))
CROP_DRAWS = 20000
CROP_SCALE, CROP_RATIO = (0.2, 1.0), (3 / 4, 4 / 3)


class NarrowResNet(tv_resnet.ResNet if tv_resnet else nn.Module):
  """torchvision's ResNet with `width` channels in its first stage (64 in torchvision).

  Only __init__ is rewritten, line by line as torchvision's with 64 -> width;
  _make_layer, BasicBlock, forward and the initialisation are torchvision's.
  """

  def __init__(self, block=None, layers=(2, 2, 2, 2), num_classes=1000, width=64,
               stem='imagenet'):
    block = block or tv_resnet.BasicBlock
    nn.Module.__init__(self)
    self._norm_layer = nn.BatchNorm2d
    self.inplanes = width
    self.dilation = 1
    self.groups = 1
    self.base_width = 64  # BasicBlock only accepts 64 (it scales nothing).
    if stem == 'imagenet':
      self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
      self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    else:  # The official CIFAR demo's stem.
      self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
      self.maxpool = nn.Identity()
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.layer1 = self._make_layer(block, width, layers[0])
    self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
    self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
    self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(8 * width * block.expansion, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
      elif isinstance(m, nn.BatchNorm2d):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)


def load_official_builder(moco_repo: str):
  """Imports the official moco/builder.py and patches it for one process (see docstring)."""
  path = os.path.join(moco_repo, 'moco', 'builder.py')
  if not os.path.exists(path):
    raise SystemExit(f'{path} not found: export facebookresearch/moco into --moco_repo '
                     '(see this script\'s docstring).')
  spec = importlib.util.spec_from_file_location('official_moco_builder', path)
  builder = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(builder)

  builder.concat_all_gather = lambda tensor: tensor
  builder.MoCo._batch_shuffle_ddp = lambda self, x: (x, torch.arange(x.shape[0]))
  builder.MoCo._batch_unshuffle_ddp = lambda self, x, idx_unshuffle: x[idx_unshuffle]

  @torch.no_grad()
  def dequeue_and_enqueue_any_k(self, keys):
    keys = builder.concat_all_gather(keys)
    batch_size = keys.shape[0]
    ptr = int(self.queue_ptr)
    slots = (ptr + torch.arange(batch_size)) % self.K
    self.queue[:, slots] = keys.T
    self.queue_ptr[0] = (ptr + batch_size) % self.K

  builder.MoCo._dequeue_and_enqueue = dequeue_and_enqueue_any_k
  torch.Tensor.cuda = lambda self, *args, **kwargs: self
  return builder


def read_images(archive: str, count: int, one_per_class: bool) -> list:
  """The first `count` JPEGs (sorted names) of the train split, as uint8 CHW tensors."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with tarfile.open(archive) as tar:
    names = sorted(m.name for m in tar.getmembers()
                   if m.isfile() and '/train/' in m.name and m.name.lower().endswith('.jpeg'))
    if one_per_class:
      firsts = {}
      for name in names:
        firsts.setdefault(name.split('/')[-2], name)
      names = sorted(firsts.values())
    images = []
    for name in names[:count]:
      with Image.open(io.BytesIO(tar.extractfile(name).read())) as im:
        images.append(torch.from_numpy(np.asarray(im.convert('RGB')).copy()).permute(2, 0, 1))
  return images


def _to_nhwc(x: torch.Tensor) -> np.ndarray:
  return x.permute(0, 2, 3, 1).contiguous().numpy()


def _state(module: nn.Module) -> dict:
  """state_dict as float32 NumPy arrays, without num_batches_tracked."""
  return {k: v.detach().to(torch.float32).numpy().copy() for k, v in module.state_dict().items()
          if not k.endswith('num_batches_tracked')}


def make_views(images: list, steps: int, size: int, generator_seed: int) -> np.ndarray:
  """uint8 [2, steps, B, size, size, 3]: query and key views (torchvision crop + flip).

  Each step takes the next B images: as in real training, the queue then holds
  keys of other images, not near-copies of this step's positives (which would
  make the loss a difference of nearly equal logits, sensitive to rounding).
  """
  torch.manual_seed(generator_seed)
  crop = torchvision.transforms.v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True)
  flip = torchvision.transforms.v2.RandomHorizontalFlip()
  batch = len(images) // steps
  views = np.zeros((2, steps, batch, size, size, 3), np.uint8)
  for view in range(2):
    for step in range(steps):
      for i, image in enumerate(images[step * batch:(step + 1) * batch]):
        views[view, step, i] = flip(crop(image)).permute(1, 2, 0).numpy()
  return views


def run_official_steps(builder, views: np.ndarray, dtype, start=None):
  """Runs STEP['steps'] official steps; returns (records per step, the initial model)."""
  s = STEP
  if start is None:
    torch.manual_seed(s['seed'])
    encoder = functools.partial(NarrowResNet, width=s['width'], stem=s['stem'])
    model = builder.MoCo(encoder, dim=s['dim'], K=s['queue_size'], m=s['moco_momentum'],
                         T=s['temperature'], mlp=True)
    start = copy.deepcopy(model)
  model = copy.deepcopy(start).to(dtype)
  model.train()
  optimizer = torch.optim.SGD(model.parameters(), s['lr'], momentum=s['sgd_momentum'],
                              weight_decay=s['weight_decay'])
  criterion = nn.CrossEntropyLoss()
  to_input = lambda u8: (torch.from_numpy(u8).permute(0, 3, 1, 2).to(dtype) / VIEW_SCALE
                         - VIEW_SHIFT)
  records = []
  for step in range(s['steps']):
    logits, labels = model(im_q=to_input(views[0, step]), im_k=to_input(views[1, step]))
    loss = criterion(logits, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    # Ours moves the key encoder at the end of the step; the official code at
    # the start of the next forward. Record the key encoder that step + 1 uses.
    shadow = copy.deepcopy(model)
    shadow._momentum_update_key_encoder()  # pylint: disable=protected-access
    records.append(dict(
        loss=loss.detach().to(torch.float64).numpy(),
        logits=logits.detach().to(torch.float32).numpy(),
        query=_state(model.encoder_q),
        key=_state(shadow.encoder_k),
        queue=model.queue.detach().T.to(torch.float32).numpy().copy(),  # [K, dim], ours.
        queue_ptr=np.asarray(int(model.queue_ptr), np.int32),
    ))
  return records, start


def official_step_golden(builder, archive: str) -> dict:
  s = STEP
  images = read_images(archive, s['batch'] * s['steps'], one_per_class=False)
  views = make_views(images, s['steps'], s['image_size'], generator_seed=1)
  records32, start = run_official_steps(builder, views, torch.float32)
  records64, _ = run_official_steps(builder, views, torch.float64, start=start)
  out = {f'setting/{k}': np.asarray(v) for k, v in s.items()}
  out['views/query'], out['views/key'] = views[0], views[1]
  out['views/scale_shift'] = np.asarray([VIEW_SCALE, VIEW_SHIFT])
  for name, value in _state(start.encoder_q).items():
    out[f'init/query/{name}'] = value
  # The official key encoder starts as a copy of the query encoder's parameters;
  # its BatchNorm buffers are a second fresh init (zeros/ones), equal to the query's.
  for name, value in _state(start.encoder_k).items():
    np.testing.assert_array_equal(value, out[f'init/query/{name}'])
  out['init/queue'] = start.queue.detach().T.numpy().copy()
  for step in (1, 3):
    rec32, rec64 = records32[step - 1], records64[step - 1]
    for field in ('loss', 'logits', 'queue', 'queue_ptr'):
      out[f'step{step}/{field}'] = rec32[field]
    # The reference's own float32 rounding: max |float32 run - float64 run|.
    for field in ('loss', 'logits', 'queue'):
      out[f'noise{step}/{field}'] = np.asarray(np.abs(rec32[field] - rec64[field]).max())
    for side in ('query', 'key'):
      names = sorted(rec32[side])
      out[f'names/{side}'] = np.asarray(names)
      for name in names:
        out[f'step{step}/{side}/{name}'] = rec32[side][name]
      out[f'noise{step}/{side}'] = np.asarray(
          [np.abs(rec32[side][n] - rec64[side][n]).max() for n in names], np.float32)
  out['losses'] = np.asarray([r['loss'] for r in records32])
  return out


def torchvision_ops_golden(archive: str) -> dict:
  images = torch.stack(read_images(archive, 4, one_per_class=True))  # uint8 [4, 3, 128, 128]
  image64 = F.resize(images, [64, 64], antialias=True)
  image32 = F.resize(images, [32, 32], antialias=True)
  x32 = image32.to(torch.float32) / 255.0
  x64 = image64.to(torch.float32) / 255.0
  half = lambda t: t.permute(0, 2, 3, 1).contiguous().to(torch.float16).numpy()
  out = {'image64': _to_nhwc(image64), 'image32': _to_nhwc(image32)}
  for f in BRIGHTNESS:
    out[f'brightness/{f}'] = half(F.adjust_brightness(x32, f))
  for f in CONTRAST:
    out[f'contrast/{f}'] = half(F.adjust_contrast(x32, f))
  for f in SATURATION:
    out[f'saturation/{f}'] = half(F.adjust_saturation(x32, f))
  for f in HUE:
    out[f'hue/{f}'] = half(F.adjust_hue(x32, f))
  out['grayscale'] = half(F.rgb_to_grayscale(x32))
  for size, sigma in BLUR:
    out[f'blur/{size}/{sigma}'] = half(F.gaussian_blur(x32, [size, size], [sigma, sigma]))
  for side, top, left, h, w in CROPS:
    src = x64 if side == 64 else x32
    out[f'resized_crop/{side}/{top}/{left}/{h}/{w}'] = half(
        F.resized_crop(src, top, left, h, w, [32, 32], antialias=True))
  out['hflip'] = half(F.horizontal_flip(x32))
  out['normalize'] = _to_nhwc(F.normalize(x32, list(MEAN), list(STD)))
  out['params/mean'], out['params/std'] = np.asarray(MEAN), np.asarray(STD)
  return out


def crop_boxes_golden() -> dict:
  torch.manual_seed(0)
  out = {'scale': np.asarray(CROP_SCALE), 'ratio': np.asarray(CROP_RATIO)}
  for height, width in CROP_IMAGES:
    image = torch.empty((3, height, width))
    boxes = [RandomResizedCrop.get_params(image, list(CROP_SCALE), list(CROP_RATIO))
             for _ in range(CROP_DRAWS)]
    out[f'boxes/{height}x{width}'] = np.asarray(boxes, np.int16)  # (top, left, h, w)
  return out


# One tensor per renaming rule of the converter (stem, bnK, layerN, downsample.0/1, bn3).
DETECTRON2_VALUES = ('stem.conv1.weight', 'stem.conv1.norm.running_var',
                     'stem.conv1.norm.num_batches_tracked', 'res2.0.conv2.norm.bias',
                     'res3.0.shortcut.weight', 'res3.0.shortcut.norm.running_mean',
                     'res5.0.conv1.weight', 'res4.0.conv3.norm.weight')


def detectron2_golden(moco_repo: str, export_dirs: list) -> dict:
  """The official converter's output for our torchvision exports in `export_dirs`."""
  import json  # pylint: disable=g-import-not-at-top
  import pickle  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  converter = os.path.join(moco_repo, 'detection', 'convert-pretrain-to-detectron2.py')
  if not os.path.exists(converter):
    raise SystemExit(f'{converter} not found: export facebookresearch/moco into --moco_repo.')
  out = {}
  for directory in export_dirs:
    with open(os.path.join(directory, 'backbone_torchvision.json')) as f:
      arch = json.load(f)['model']['name']
    exported = dict(np.load(os.path.join(directory, 'backbone_torchvision.npz')))
    state = {}
    for side in ('encoder_q', 'encoder_k'):
      state.update({f'module.{side}.{k}': torch.from_numpy(np.array(v))
                    for k, v in exported.items()})
    state['module.queue'] = torch.zeros(16, 32)
    state['module.queue_ptr'] = torch.zeros(1, dtype=torch.long)
    with tempfile.TemporaryDirectory() as tmp:
      source, target = os.path.join(tmp, 'in.pth.tar'), os.path.join(tmp, 'out.pkl')
      torch.save({'epoch': 1, 'arch': arch, 'state_dict': state}, source)
      subprocess.run([sys.executable, converter, source, target], check=True,
                     stdout=subprocess.DEVNULL)
      with open(target, 'rb') as f:
        result = pickle.load(f)
    model = result.pop('model')
    names = sorted(model)
    for k, v in exported.items():
      out[f'{arch}/input/{k}'] = v
    out[f'{arch}/names'] = np.asarray(names)
    out[f'{arch}/shapes'] = np.asarray([str(tuple(model[n].shape)) for n in names])
    out[f'{arch}/dtypes'] = np.asarray([str(model[n].dtype) for n in names])
    out[f'{arch}/fields'] = np.asarray(json.dumps(result, sort_keys=True))
    for name in DETECTRON2_VALUES:
      if name in model:
        out[f'{arch}/values/{name}'] = np.asarray(model[name])
  out['archs'] = np.asarray(sorted({k.split('/')[0] for k in out}))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--moco_repo', default=os.path.join(_ROOT, '.peer', 'moco'),
                      help='A checkout of facebookresearch/moco (commit 3b42c2a).')
  parser.add_argument('--images', default=os.path.join(os.path.dirname(_ROOT), 'shared', 'data',
                                                       'imagenette2-128sq.tgz'),
                      help='Imagenette archive (128 px squares) the images come from.')
  parser.add_argument('--out_dir', default=OUT_DIR)
  parser.add_argument('--only', choices=('all', 'equivalence', 'detectron2'), default='all',
                      help='equivalence: the three torchvision/builder.py files; detectron2: '
                      'detectron2_convert.npz (torch only).')
  parser.add_argument('--detectron2_exports', default='',
                      help='Comma-separated workdirs holding our backbone_torchvision.npz/.json.')
  args = parser.parse_args()
  torch.set_num_threads(1)
  torch.use_deterministic_algorithms(True)
  os.makedirs(args.out_dir, exist_ok=True)
  files = {}
  if args.only in ('all', 'equivalence'):
    if torchvision is None:
      raise SystemExit(f'torchvision does not import ({TORCHVISION_ERROR}); install the '
                       'torchvision build of this torch.')
    builder = load_official_builder(args.moco_repo)
    files['official_moco_step.npz'] = official_step_golden(builder, args.images)
    files['torchvision_ops.npz'] = torchvision_ops_golden(args.images)
    files['torchvision_crop_boxes.npz'] = crop_boxes_golden()
  if args.only in ('all', 'detectron2'):
    if not args.detectron2_exports:
      raise SystemExit('--detectron2_exports is needed (see this script\'s docstring).')
    files['detectron2_convert.npz'] = detectron2_golden(
        args.moco_repo, args.detectron2_exports.split(','))
  versions = np.asarray(f'torch {torch.__version__}, torchvision '
                        f'{torchvision.__version__ if torchvision else "(none)"}')
  for name, arrays in files.items():
    path = os.path.join(args.out_dir, name)
    np.savez_compressed(path, versions=versions, **arrays)
    print(f'{path}: {os.path.getsize(path) / 1e3:.0f} kB, {len(arrays)} arrays')
  if 'official_moco_step.npz' in files:
    print('official losses (steps 1-3):', files['official_moco_step.npz']['losses'])


if __name__ == '__main__':
  main()
