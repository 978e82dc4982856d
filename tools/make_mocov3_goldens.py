"""Writes tests/data/official_mocov3_step.npz: two steps of the official moco-v3 code.

The companion of tools/make_goldens.py (MoCo v2) for MoCo v3; it needs torch
only (no torchvision, no timm), so it runs in any CPU torch venv:

  # `fetch github:facebookresearch/moco-v3` gives GITDIR; export it (never committed):
  mkdir -p .peer/moco-v3 && git --git-dir=GITDIR archive HEAD | tar -x -C .peer/moco-v3
  /work/venvs/torch/bin/python tools/make_mocov3_goldens.py --mocov3_repo=.peer/moco-v3

What runs unedited: moco-v3's `moco/builder.py` (MoCo_ResNet, MoCo_ViT: heads,
momentum update, symmetric loss), `moco/optimizer.py` (LARS) and `vits.py`
(VisionTransformerMoCo: init, 2-D sin-cos position embedding, stop_grad_conv1).
What is provided here, by monkeypatching or stand-ins:
  * world size 1: `concat_all_gather` is the identity, `get_rank()` is 0 and
    `Tensor.cuda` the identity (one process sees the whole batch, as ours on
    one device with SyncBN);
  * vits.py subclasses timm's VisionTransformer; timm (which needs
    torchvision) is replaced by `_TimmViT` below, a transcription of timm
    0.4.x's ViT forward (pre-norm blocks, qkv Linear, scale after q k^T,
    exact GELU, LayerNorm, class token): its names match timm's state_dict;
  * the ResNet is `_TinyResNet`, torchvision's BasicBlock ResNet with one
    block per stage, width 4 and the CIFAR stem, under torchvision's names,
    with zero_init_residual as main_moco.py asks.
Each case runs twice from the same float32 start, in float32 and float64; the
per-array max |float32 - float64| is stored as the reference's own rounding.
Inputs are fixed uint8 views fed as u8 / 64 - 2 (exact in float32).
"""

import argparse
import copy
import importlib.util
import os
import sys
import types

import numpy as np
import torch
from torch import nn

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(_ROOT, 'tests', 'data', 'official_mocov3_step.npz')
VIEW_SCALE, VIEW_SHIFT = 64.0, 2.0
COMMON = dict(seed=0, image_size=16, batch=8, dim=16, mlp_dim=32, steps=2, moco_momentum=0.99)
CASES = {
    'resnet': dict(COMMON, temperature=1.0, optimizer='lars', lr=0.1, weight_decay=1e-2,
                   sgd_momentum=0.9, width=4),
    'vit': dict(COMMON, temperature=0.2, optimizer='adamw', lr=1e-3, weight_decay=0.1,
                patch=4, embed_dim=16, depth=2, heads=2),
}


# --------------------------------------------------------------------------
# Stand-ins for timm and torchvision.


def _to_2tuple(x):
  return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


class _PatchEmbed(nn.Module):
  """timm's PatchEmbed: a strided conv, flattened to tokens."""

  def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
    super().__init__()
    self.img_size, self.patch_size = _to_2tuple(img_size), _to_2tuple(patch_size)
    self.grid_size = (self.img_size[0] // self.patch_size[0],
                      self.img_size[1] // self.patch_size[1])
    self.num_patches = self.grid_size[0] * self.grid_size[1]
    self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class _Attention(nn.Module):

  def __init__(self, dim, num_heads, qkv_bias):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads)**-0.5
    self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):

  def __init__(self, dim, num_heads, mlp_ratio, qkv_bias, norm_layer):
    super().__init__()
    self.norm1, self.attn = norm_layer(dim), _Attention(dim, num_heads, qkv_bias)
    self.norm2, self.mlp = norm_layer(dim), _Mlp(dim, int(dim * mlp_ratio))

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class _TimmViT(nn.Module):
  """timm 0.4.x VisionTransformer's structure and forward (no dropout, class-token pooling)."""

  def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768,
               depth=12, num_heads=12, mlp_ratio=4., qkv_bias=True, norm_layer=None,
               embed_layer=_PatchEmbed):
    super().__init__()
    self.num_features = self.embed_dim = embed_dim
    self.num_tokens = 1
    self.patch_embed = embed_layer(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                   embed_dim=embed_dim)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
    self.blocks = nn.Sequential(*[_Block(embed_dim, num_heads, mlp_ratio, qkv_bias, norm_layer)
                                  for _ in range(depth)])
    self.norm = norm_layer(embed_dim)
    self.head = nn.Linear(embed_dim, num_classes)

  def forward(self, x):
    x = self.patch_embed(x)
    x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
    return self.head(self.norm(self.blocks(x))[:, 0])


def _install_timm_stand_in():
  """Registers the modules vits.py imports from timm, backed by the stand-ins above."""
  modules = {name: types.ModuleType(name) for name in (
      'timm', 'timm.models', 'timm.models.vision_transformer', 'timm.models.layers',
      'timm.models.layers.helpers')}
  modules['timm.models.vision_transformer'].VisionTransformer = _TimmViT
  modules['timm.models.vision_transformer']._cfg = lambda **kwargs: dict(kwargs)  # pylint: disable=protected-access
  modules['timm.models.layers'].PatchEmbed = _PatchEmbed
  modules['timm.models.layers.helpers'].to_2tuple = _to_2tuple
  sys.modules.update(modules)


class _BasicBlock(nn.Module):
  """torchvision's BasicBlock (names conv1, bn1, conv2, bn2, downsample)."""

  def __init__(self, inplanes, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = None
    if stride != 1 or inplanes != planes:
      self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                      nn.BatchNorm2d(planes))

  def forward(self, x):
    out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
    return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class _TinyResNet(nn.Module):
  """torchvision's ResNet layout, one BasicBlock per stage, CIFAR stem, zero_init_residual."""

  def __init__(self, num_classes=1000, width=4, zero_init_residual=True):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    widths = [width * 2**i for i in range(4)]
    for i, planes in enumerate(widths):
      inplanes = widths[i - 1] if i else width
      setattr(self, f'layer{i + 1}', nn.Sequential(_BasicBlock(inplanes, planes, 2 if i else 1)))
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    self.fc = nn.Linear(widths[-1], num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
    if zero_init_residual:
      for m in self.modules():
        if isinstance(m, _BasicBlock):
          nn.init.constant_(m.bn2.weight, 0)

  def forward(self, x):
    x = self.relu(self.bn1(self.conv1(x)))
    for i in range(4):
      x = getattr(self, f'layer{i + 1}')(x)
    return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------
# The official modules.


def _load(repo: str, relative: str, name: str):
  path = os.path.join(repo, relative)
  if not os.path.exists(path):
    raise SystemExit(f'{path} not found: export facebookresearch/moco-v3 into --mocov3_repo '
                     '(see this script\'s docstring).')
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_official(repo: str):
  """(builder, optimizer, vits) of moco-v3, patched for one process."""
  _install_timm_stand_in()
  builder = _load(repo, 'moco/builder.py', 'official_mocov3_builder')
  optimizer = _load(repo, 'moco/optimizer.py', 'official_mocov3_optimizer')
  vits = _load(repo, 'vits.py', 'official_mocov3_vits')
  builder.concat_all_gather = lambda tensor: tensor
  torch.distributed.get_rank = lambda *args, **kwargs: 0
  torch.Tensor.cuda = lambda self, *args, **kwargs: self
  return builder, optimizer, vits


def _state(module: nn.Module) -> dict:
  return {k: v.detach().to(torch.float32).numpy().copy() for k, v in module.state_dict().items()
          if not k.endswith('num_batches_tracked')}


def build_model(case: str, official):
  builder, _, vits = official
  s = CASES[case]
  torch.manual_seed(s['seed'])
  if case == 'vit':
    def encoder(num_classes):
      return vits.VisionTransformerMoCo(
          stop_grad_conv1=True, img_size=s['image_size'], patch_size=s['patch'],
          embed_dim=s['embed_dim'], depth=s['depth'], num_heads=s['heads'], mlp_ratio=4,
          qkv_bias=True, norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6), num_classes=num_classes)
    return builder.MoCo_ViT(encoder, s['dim'], s['mlp_dim'], s['temperature'])
  encoder = lambda num_classes: _TinyResNet(num_classes, width=s['width'])
  return builder.MoCo_ResNet(encoder, s['dim'], s['mlp_dim'], s['temperature'])


def run_steps(case: str, official, start, views, dtype):
  """Official training steps of `case` from `start`; one record per step."""
  _, optim_lib, _ = official
  s = CASES[case]
  model = copy.deepcopy(start).to(dtype)
  model.train()
  if s['optimizer'] == 'lars':
    optimizer = optim_lib.LARS(model.parameters(), s['lr'], weight_decay=s['weight_decay'],
                               momentum=s['sgd_momentum'])
  else:
    optimizer = torch.optim.AdamW(model.parameters(), s['lr'], weight_decay=s['weight_decay'])
  to_input = lambda u8: (torch.from_numpy(u8).permute(0, 3, 1, 2).to(dtype) / VIEW_SCALE
                         - VIEW_SHIFT)
  records = []
  for step in range(s['steps']):
    loss = model(to_input(views[0, step]), to_input(views[1, step]), s['moco_momentum'])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    records.append(dict(loss=loss.detach().to(torch.float64).numpy(), state=_state(model)))
  return records


def make_views(seed: int, steps: int, batch: int, size: int) -> np.ndarray:
  """uint8 [2, steps, batch, size, size, 3]: smooth random images, two noisy views of each."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (steps, batch, size // 4, size // 4, 3))
  base = np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3)
  views = [np.clip(base + rng.normal(0, 25, base.shape), 0, 255) for _ in range(2)]
  return np.stack(views).astype(np.uint8)


def case_golden(case: str, official) -> dict:
  s = CASES[case]
  views = make_views(s['seed'] + 1, s['steps'], s['batch'], s['image_size'])
  start = build_model(case, official)
  rec32 = run_steps(case, official, start, views, torch.float32)
  rec64 = run_steps(case, official, start, views, torch.float64)
  out = {f'{case}/setting/{k}': np.asarray(v) for k, v in s.items()}
  out[f'{case}/views'] = views
  init = _state(start)
  for name, value in init.items():
    if name.startswith('momentum_encoder.'):
      # builder.py copies the parameters; the BN buffers are a second fresh init: equal too.
      np.testing.assert_array_equal(value, init['base_encoder.' + name.split('.', 1)[1]])
    else:
      out[f'{case}/init/{name}'] = value
  names = sorted(rec32[0]['state'])
  out[f'{case}/names'] = np.asarray(names)
  for step in range(1, s['steps'] + 1):
    r32, r64 = rec32[step - 1], rec64[step - 1]
    out[f'{case}/step{step}/loss'] = r32['loss']
    out[f'{case}/noise{step}/loss'] = np.abs(r32['loss'] - r64['loss'])
    for name in names:
      # Step 1's momentum encoder is its start (m x p + (1 - m) x p): only the last is kept.
      if step == s['steps'] or not name.startswith('momentum_encoder.'):
        out[f'{case}/step{step}/{name}'] = r32['state'][name]
    out[f'{case}/noise{step}/state'] = np.asarray(
        [np.abs(r32['state'][n] - r64['state'][n]).max() for n in names], np.float32)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--mocov3_repo', default=os.path.join(_ROOT, '.peer', 'moco-v3'))
  parser.add_argument('--out', default=OUT)
  args = parser.parse_args()
  torch.set_num_threads(1)
  torch.use_deterministic_algorithms(True)
  official = load_official(args.mocov3_repo)
  out = {'versions': np.asarray(f'torch {torch.__version__}')}
  for case in CASES:
    out.update(case_golden(case, official))
    print(case, 'official losses:', [float(out[f'{case}/step{t}/loss']) for t in (1, 2)])
  np.savez_compressed(args.out, **out)
  print(f'{args.out}: {os.path.getsize(args.out) / 1e3:.0f} kB, {len(out)} arrays')


if __name__ == '__main__':
  main()
