"""Vision Transformer backbone as MoCo v3's `vits.py` (timm's ViT, MoCo v3's init).

Why these choices: MoCo v3 found ViT training unstable and fixed it with a
frozen random patch projection (`stop_grad_conv1`) and a fixed 2-D sin-cos
position embedding; its numbers hold only with them, so they are defaults
here, as is the official initialisation (xavier-uniform Linear layers, Q, K
and V treated as three matrices, cls token N(0, 1e-6)). Any patch size works,
so CIFAR's 32 px images can use patch 4. The feature is the class token after
the final LayerNorm (timm's `forward_features`), which every evaluation reads.

Layout follows timm (pre-norm blocks: x + attn(norm1(x)), x + mlp(norm2(x));
LayerNorm eps 1e-6; exact-erf GELU; qkv with bias), so weights map one to one.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# name: (patch, dim, depth, heads); mlp_ratio 4 for all.
VIT_ARCHS = {
    'vit_small': (16, 384, 12, 12),
    'vit_base': (16, 768, 12, 12),
    # Used for testing only: two blocks of width 16, patch 4.
    'vit_tiny': (4, 16, 2, 2),
}


def sincos_position_embedding(grid: int, dim: int, temperature: float = 10000.0,
                              dtype=np.float32) -> np.ndarray:
  """[1 + grid^2, dim] fixed position embedding of vits.py (a zero row for the cls token).

  Computed in `dtype`: float32 as the official code, float64 in a float64 run
  (a float32 table would put float32 rounding into every token).

  The official code builds `meshgrid(arange(w), arange(h))` with torch's 'ij'
  indexing, so for patch p (row-major) its first half encodes p // grid and its
  second half p % grid; reproduced as is, so weights stay interchangeable.
  """
  if dim % 4:
    raise ValueError(f'ViT width {dim} must be divisible by 4 for the 2-D sin-cos embedding.')
  pos_dim = dim // 4
  omega = 1.0 / temperature**(np.arange(pos_dim, dtype=dtype) / pos_dim)
  index = np.arange(grid * grid)
  out_w = (index // grid).astype(dtype)[:, None] * omega[None]
  out_h = (index % grid).astype(dtype)[:, None] * omega[None]
  emb = np.concatenate([np.sin(out_w), np.cos(out_w), np.sin(out_h), np.cos(out_h)], axis=1)
  return np.concatenate([np.zeros((1, dim), dtype), emb], axis=0).astype(dtype)


def _uniform(limit: float):
  """U(-limit, limit) initialiser."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -limit, limit)
  return init


def _qkv_init(key, shape, dtype=jnp.float32):
  """vits.py: Q, K, V each xavier-uniform as a [dim, dim] matrix, not one [dim, 3 dim]."""
  dim = shape[0]
  return _uniform(math.sqrt(6.0 / (dim + shape[1] // 3)))(key, shape, dtype)


_xavier = nn.initializers.xavier_uniform()


class EncoderBlock(nn.Module):
  """timm's pre-norm Transformer block: multi-head self-attention, then a GELU MLP."""
  dim: int
  heads: int
  mlp_ratio: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    norm = lambda name: nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=name)
    dense = lambda width, name, init=_xavier: nn.Dense(width, dtype=self.dtype, kernel_init=init,
                                                       name=name)
    batch, tokens, _ = x.shape
    head_dim = self.dim // self.heads
    qkv = dense(3 * self.dim, 'qkv', _qkv_init)(norm('norm1')(x))
    qkv = qkv.reshape(batch, tokens, 3, self.heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    attn = jnp.einsum('bqhd,bkhd->bhqk', q * head_dim**-0.5, k)
    attn = jax.nn.softmax(attn.astype(jnp.promote_types(attn.dtype, jnp.float32)),
                          axis=-1).astype(self.dtype)
    y = jnp.einsum('bhqk,bkhd->bqhd', attn, v).reshape(batch, tokens, self.dim)
    x = x + dense(self.dim, 'proj')(y)
    y = dense(self.dim * self.mlp_ratio, 'fc1')(norm('norm2')(x))
    y = nn.gelu(y, approximate=False)
    return x + dense(self.dim, 'fc2')(y)


class ViT(nn.Module):
  """ViT backbone returning the class token [N, dim] after the final LayerNorm.

  Attributes:
    patch: patch side in pixels (16 for ImageNet, 4 for 32 px CIFAR).
    dim: token width.
    depth: number of blocks.
    heads: attention heads.
    stop_grad_conv1: freeze the random patch projection (MoCo v3's fix for
      instability): no gradient reaches it, and `frozen_params_mask` tells the
      optimiser not to decay it either.
    dtype: compute dtype.
  """
  patch: int
  dim: int
  depth: int
  heads: int
  stop_grad_conv1: bool = True
  dtype: Any = jnp.float32

  @property
  def num_features(self) -> int:
    return self.dim

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train  # No BatchNorm or dropout in the backbone.
    size = x.shape[1]
    if size % self.patch or x.shape[2] != size:
      raise ValueError(f'ViT: image {x.shape[1]}x{x.shape[2]} is not square or not a multiple '
                       f'of the patch {self.patch} (data.image_size / model.patch_size).')
    limit = math.sqrt(6.0 / (3 * self.patch * self.patch + self.dim))
    kernel = self.param('patch_kernel', _uniform(limit), (self.patch, self.patch, 3, self.dim))
    bias = self.param('patch_bias', nn.initializers.zeros, (self.dim,))
    if self.stop_grad_conv1:
      kernel, bias = jax.lax.stop_gradient(kernel), jax.lax.stop_gradient(bias)
    x = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), (self.patch, self.patch), 'VALID',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=jax.lax.Precision.HIGHEST)
    x = x + bias.astype(self.dtype)
    batch, grid = x.shape[0], x.shape[1]
    x = x.reshape(batch, grid * grid, self.dim)
    cls = self.param('cls_token', nn.initializers.normal(1e-6), (1, 1, self.dim))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, self.dim)), x], 1)
    table = sincos_position_embedding(grid, self.dim, dtype=self._wide)
    x = x + jnp.asarray(table, self.dtype)[None]
    for i in range(self.depth):
      x = EncoderBlock(self.dim, self.heads, dtype=self.dtype, name=f'block{i}')(x)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='norm')(x)
    return x[:, 0].astype(self._wide)  # float32, or float64 in a float64 run.

  @property
  def _wide(self):
    """float32 for float32 and bfloat16 runs, float64 for a float64 run."""
    return np.dtype(jnp.promote_types(self.dtype, jnp.float32))


def frozen_params_mask(params) -> Any:
  """True for the parameters no optimiser may touch: the frozen patch projection."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(getattr(k, 'key', None) in ('patch_kernel', 'patch_bias')
                          for k in path), params)


def create_vit(model_config) -> ViT:
  """The ViT `model_config.name` names; `model.patch_size` > 0 overrides its patch."""
  patch, dim, depth, heads = VIT_ARCHS[model_config.name]
  if model_config.get('patch_size', -1) > 0:
    patch = int(model_config.patch_size)
  return ViT(patch=patch, dim=dim, depth=depth, heads=heads,
             stop_grad_conv1=bool(model_config.get('stop_grad_conv1', True)),
             dtype=jnp.dtype(model_config.dtype))
