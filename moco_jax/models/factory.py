"""`config.model` -> a backbone or encoder, whatever the family (ResNet or ViT)."""

from typing import Optional

import jax.numpy as jnp

from moco_jax.models import mocov3_heads
from moco_jax.models import resnet
from moco_jax.models import vit

# Every `model.name` the factory knows.
NAMES = tuple(resnet.ARCHS) + tuple(vit.VIT_ARCHS)


def is_vit(model_config) -> bool:
  return model_config.name in vit.VIT_ARCHS


def create_backbone(model_config, *, bn_splits: int = 1, bn_axis_name: Optional[str] = None):
  """The backbone `model_config.name` names; a ViT has no BatchNorm, so ignores the BN mode."""
  if is_vit(model_config):
    return vit.create_vit(model_config)
  return resnet.create_backbone(model_config, bn_splits=bn_splits, bn_axis_name=bn_axis_name)


def create_mocov3_encoder(model_config, *, bn_axis_name: Optional[str] = None):
  """Backbone + v3 projector + predictor (builder.py's MoCo_ResNet / MoCo_ViT).

  ResNet: projector 2 layers, predictor 2 without last BN; ViT: projector 3,
  predictor 2 with last BN, as builder.py. Widths: model.mlp_dim, model.embed_dim.
  """
  backbone = create_backbone(model_config, bn_axis_name=bn_axis_name)
  mlp = lambda layers, last_bn: mocov3_heads.MLP(
      layers, int(model_config.mlp_dim), int(model_config.embed_dim), last_bn=last_bn,
      bn_axis_name=bn_axis_name, dtype=jnp.dtype(model_config.dtype))
  vit_like = is_vit(model_config)
  return mocov3_heads.MoCoV3Encoder(backbone=backbone, head=mlp(3 if vit_like else 2, True),
                                    predictor=mlp(2, vit_like))


def frozen_params_mask(model_config, params):
  """Pytree of bools, True where no optimiser may change a parameter; None if none is frozen."""
  if is_vit(model_config) and model_config.get('stop_grad_conv1', True):
    return vit.frozen_params_mask(params)
  return None
