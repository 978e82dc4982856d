"""MoCo v3's projector and predictor MLPs and the encoder that carries them (official builder.py).

Why separate from the v2 `ProjectionHead`: v3's MLPs are Linear without bias +
BatchNorm + ReLU per hidden layer, the projector ends in a BatchNorm without
affine (SimCLR's design), and the predictor sits on the query side only; the
widths (hidden 4096, out 256) and depths (ResNet: projector 2, ViT: projector
3; predictor 2) are the paper's. Linear layers keep torch's default init
(U(+-1/sqrt(fan_in))): builder.py builds the MLPs after vits.py's init runs.
BatchNorm is the project's (`resnet.BatchNorm`), synchronised over devices
with `bn_axis_name` as the official SyncBN.
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from moco_jax.models import resnet

# torch.nn.Linear's default init: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


class MLP(nn.Module):
  """builder.py's `_build_mlp`: `num_layers` Linear (no bias) layers, BN + ReLU between.

  Attributes:
    num_layers: Linear layers (>= 1).
    hidden_dim: width of the hidden layers (mlp_dim, 4096).
    out_dim: output width (dim, 256).
    last_bn: end in BatchNorm without affine.
    bn_axis_name: mapped axis for SyncBN, or None.
    dtype: compute dtype (output is float32, float64 for a float64 run).
  """
  num_layers: int
  hidden_dim: int
  out_dim: int
  last_bn: bool = True
  bn_axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = functools.partial(resnet.BatchNorm, use_running_average=not train,
                             axis_name=self.bn_axis_name, dtype=self.dtype)
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      x = nn.Dense(self.out_dim if last else self.hidden_dim, use_bias=False, dtype=self.dtype,
                   kernel_init=TORCH_LINEAR_INIT, name=f'fc{i + 1}')(x)
      if not last:
        x = nn.relu(norm(name=f'bn{i + 1}')(x))
      elif self.last_bn:
        x = norm(affine=False, name=f'bn{i + 1}')(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))  # float64 stays float64.


class MoCoV3Encoder(nn.Module):
  """Backbone + projector (+ predictor): the trained encoder of MoCo v3.

  `features_only` gives the backbone features (evaluation), `predict=False`
  the projector output (the momentum encoder: its params are the same tree
  without 'predictor', which is then never touched).
  """
  backbone: nn.Module
  head: MLP
  predictor: MLP

  def __call__(self, x, train: bool = True, features_only: bool = False, predict: bool = True):
    features = self.backbone(x, train=train)
    if features_only:
      return features
    z = self.head(features, train=train)
    return self.predictor(z, train=train) if predict else z
