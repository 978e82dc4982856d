"""ResNet encoders with a MoCo projection head (Flax Linen).

The layout follows torchvision's ResNet so that exported weights map one to one
onto `torchvision.models.resnet18/50` (see `moco_jax.evaluation.export`). BatchNorm is our
own module because MoCo needs three kinds of batch statistics: per device,
synchronised across devices (`axis_name`) and split into groups within one
device (`num_splits`, the official single-GPU emulation of Shuffle BN).
"""

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Any


class BatchNorm(nn.Module):
  """BatchNorm over the batch axis, optionally per group or across devices.

  Attributes:
    use_running_average: inference mode (use the stored statistics).
    num_splits: the local batch is cut into this many groups, each normalised
      with its own statistics (the running statistics average the groups).
      Running variances are unbiased (n / (n - 1), n values per statistic
      per group, across devices with `axis_name`), as torch's BatchNorm.
    axis_name: if set, statistics are averaged over this mapped axis (SyncBN).
    momentum: decay of the running statistics (torch's 0.1 is 0.9 here).
    epsilon: added to the variance.
    dtype: output dtype; statistics are computed in float32 (float64 for a
      float64 input: the equivalence test's float64 run).
    scale_init: initialiser of the scale (gamma).
    affine: learn scale and bias; False is torch's `affine=False` (MoCo v3's
      projector ends in one), with no params at all.
  """
  use_running_average: bool = False
  num_splits: int = 1
  axis_name: Optional[str] = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones
  affine: bool = True

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    if self.affine:
      scale = self.param('scale', self.scale_init, (features,), jnp.float32)
      bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    else:
      scale, bias = 1.0, 0.0
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)

    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if self.use_running_average:
      y = (x32 - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)
    else:
      n = x.shape[0]
      groups = self.num_splits
      if n % groups:
        raise ValueError(f'BatchNorm: batch {n} does not split into num_splits={groups} equal '
                         'groups (config.moco.bn_splits).')
      xg = x32.reshape((groups, n // groups) + x.shape[1:])
      axes = tuple(range(1, xg.ndim - 1))
      mean = jnp.mean(xg, axis=axes, keepdims=True)
      mean_sq = jnp.mean(jnp.square(xg), axis=axes, keepdims=True)
      if self.axis_name is not None:
        mean, mean_sq = jax.lax.pmean((mean, mean_sq), self.axis_name)
      var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
      y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
      if not self.is_initializing():
        # Normalisation uses the biased variance; the running estimate, as torch's,
        # the unbiased one: count / (count - 1), count = values per statistic.
        count = xg[0].size // features
        if self.axis_name is not None:
          count *= jax.lax.axis_size(self.axis_name)
        unbiased = var * (count / max(count - 1, 1))
        group_mean = jnp.mean(mean.reshape(groups, features), axis=0)
        group_var = jnp.mean(unbiased.reshape(groups, features), axis=0)
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * group_mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * group_var
    return (y * scale + bias).astype(self.dtype)


# torchvision pads every 3x3 convolution by 1 on each side. 'SAME' would pad a
# stride-2 convolution of an even input by (0, 1) instead, shifting the sampling
# grid: the features would no longer match the exported torchvision model.
_PAD3 = ((1, 1), (1, 1))


def _shortcut(x, y, conv: ModuleDef, norm: ModuleDef, strides: int):
  """The block's input, projected (1x1 conv + BN, torchvision's `downsample`) if shapes differ.

  Called inside a block's compact __call__, so the two layers belong to that block.
  """
  if x.shape == y.shape:
    return x
  x = conv(y.shape[-1], (1, 1), (strides, strides), name='downsample_conv')(x)
  return norm(name='downsample_bn')(x)


class _Block(nn.Module):
  """What every residual block is given: its width, conv and norm factories, its stride."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  # torchvision's zero_init_residual (MoCo v3's ResNet-50): the block's last BN
  # starts with scale 0, so every block starts as the identity.
  zero_init_last: bool = False

  def last_norm(self, name: str):
    init = nn.initializers.zeros if self.zero_init_last else nn.initializers.ones
    return self.norm(name=name, scale_init=init)


class BasicBlock(_Block):
  """ResNet-18/34 block: two 3x3 convolutions."""

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides), padding=_PAD3,
                  name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.filters, (3, 3), padding=_PAD3, name='conv2')(y)
    y = self.last_norm('bn2')(y)
    return nn.relu(_shortcut(x, y, self.conv, self.norm, self.strides) + y)


class Bottleneck(_Block):
  """ResNet-50 block: 1x1, 3x3 (strided, as torchvision v1.5), 1x1 x4."""

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.filters, (1, 1), name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides), padding=_PAD3,
                  name='conv2')(y)
    y = nn.relu(self.norm(name='bn2')(y))
    y = self.conv(self.filters * 4, (1, 1), name='conv3')(y)
    y = self.last_norm('bn3')(y)
    return nn.relu(_shortcut(x, y, self.conv, self.norm, self.strides) + y)


class ResNet(nn.Module):
  """ResNet backbone returning globally pooled features [N, C].

  Attributes:
    stage_sizes: blocks per stage.
    block_cls: BasicBlock or Bottleneck.
    width: channels of the first stage.
    stem: 'imagenet' (7x7 stride 2 + 3x3 max-pool) or 'cifar' (3x3 stride 1).
    dtype: compute dtype.
    bn_splits: BatchNorm groups per device (see BatchNorm.num_splits).
    bn_axis_name: mapped axis for synchronised BatchNorm, or None.
    zero_init_residual: each block's last BatchNorm scale starts at 0
      (torchvision's flag; MoCo v3's ResNet-50 sets it).
  """
  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  width: int = 64
  stem: str = 'imagenet'
  dtype: Any = jnp.float32
  bn_splits: int = 1
  bn_axis_name: Optional[str] = None
  zero_init_residual: bool = False

  @property
  def num_features(self) -> int:
    expansion = 4 if self.block_cls is Bottleneck else 1
    return self.width * 2 ** (len(self.stage_sizes) - 1) * expansion

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(
        nn.Conv, use_bias=False, dtype=self.dtype, padding='VALID',
        kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'))
    norm = functools.partial(
        BatchNorm, use_running_average=not train, num_splits=self.bn_splits,
        axis_name=self.bn_axis_name, dtype=self.dtype)
    x = x.astype(self.dtype)
    if self.stem == 'imagenet':
      x = conv(self.width, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name='conv1')(x)
      x = nn.relu(norm(name='bn1')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    elif self.stem == 'cifar':
      x = conv(self.width, (3, 3), padding=_PAD3, name='conv1')(x)
      x = nn.relu(norm(name='bn1')(x))
    else:
      raise ValueError(f"model.stem={self.stem!r}: expected 'imagenet' or 'cifar'.")
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block_cls(self.width * 2 ** i, conv=conv, norm=norm, strides=strides,
                           zero_init_last=self.zero_init_residual,
                           name=f'layer{i + 1}_{j}')(x)
    return jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=(1, 2))


class ProjectionHead(nn.Module):
  """MoCo head, float32 out: an MLP (v2) or a single Linear (v1).

  Attributes:
    kind: 'mlp': Linear-ReLU-...-Linear, one hidden layer per entry of
      `hidden_dims` (v2: one, as wide as the backbone's features); 'linear':
      one Linear layer (`hidden_dims` unused).
    hidden_dims: widths of the MLP's hidden layers.
    embed_dim: output width = the dimension of the keys in the queue.
    dtype: compute dtype.

  Layers are named fc1, fc2, ... (mlp) or fc (linear), so a v2 head is fc1-fc2
  whatever its widths.
  """
  kind: str
  hidden_dims: Sequence[int]
  embed_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(nn.Dense, dtype=self.dtype)
    if self.kind == 'mlp':
      for i, width in enumerate(self.hidden_dims):
        x = nn.relu(dense(width, name=f'fc{i + 1}')(x))
      x = dense(self.embed_dim, name=f'fc{len(self.hidden_dims) + 1}')(x)
    elif self.kind == 'linear':
      x = dense(self.embed_dim, name='fc')(x)
    else:
      raise ValueError(f"model.head={self.kind!r}: expected 'mlp' or 'linear'.")
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))  # float64 stays.


class MoCoEncoder(nn.Module):
  """Backbone + projection head; `features_only=True` returns backbone features."""
  backbone: ResNet
  head: ProjectionHead

  def __call__(self, x, train: bool = True, features_only: bool = False):
    features = self.backbone(x, train=train)
    if features_only:
      return features
    return self.head(features)


ARCHS = {
    'resnet18': ((2, 2, 2, 2), BasicBlock),
    'resnet34': ((3, 4, 6, 3), BasicBlock),
    'resnet50': ((3, 4, 6, 3), Bottleneck),
    # Used for testing only: one block per stage, runs in milliseconds on CPU.
    'resnet_tiny': ((1, 1, 1, 1), BasicBlock),
}


def create_backbone(model_config, *, bn_splits: int = 1,
                    bn_axis_name: Optional[str] = None) -> ResNet:
  """Builds the ResNet named by `model_config.name`."""
  if model_config.name not in ARCHS:
    raise ValueError(f'model.name={model_config.name!r}: expected one of {sorted(ARCHS)}.')
  stage_sizes, block_cls = ARCHS[model_config.name]
  return ResNet(stage_sizes=stage_sizes, block_cls=block_cls, width=model_config.width,
                stem=model_config.stem, dtype=jnp.dtype(model_config.dtype),
                bn_splits=bn_splits, bn_axis_name=bn_axis_name,
                zero_init_residual=bool(model_config.get('zero_init_residual', False)))


def create_encoder(model_config, *, bn_splits: int = 1,
                   bn_axis_name: Optional[str] = None) -> MoCoEncoder:
  """Builds backbone + head from `config.model` with the given BatchNorm mode."""
  backbone = create_backbone(model_config, bn_splits=bn_splits, bn_axis_name=bn_axis_name)
  head = ProjectionHead(kind=model_config.head,
                        hidden_dims=head_hidden_dims(model_config, backbone.num_features),
                        embed_dim=model_config.embed_dim, dtype=jnp.dtype(model_config.dtype))
  return MoCoEncoder(backbone=backbone, head=head)


def head_hidden_dims(model_config, num_features: int) -> tuple:
  """Hidden widths of the MLP head: head_dims without its last entry (the key dim), or
  v2's one hidden layer of `head_hidden_dim` (-1: `num_features`) when head_dims is empty."""
  dims = tuple(model_config.get('head_dims', ()) or ())
  if dims:
    return tuple(int(d) for d in dims[:-1])
  hidden = model_config.head_hidden_dim
  return (int(hidden) if hidden > 0 else int(num_features),)
