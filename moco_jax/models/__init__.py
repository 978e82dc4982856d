"""Encoders: the ResNet (torchvision layout) and ViT (MoCo v3's vits.py) backbones, BatchNorm modes and the heads."""

from moco_jax.models.factory import NAMES
from moco_jax.models.factory import create_backbone
from moco_jax.models.factory import create_mocov3_encoder
from moco_jax.models.factory import frozen_params_mask
from moco_jax.models.factory import is_vit
from moco_jax.models.mocov3_heads import MLP
from moco_jax.models.mocov3_heads import MoCoV3Encoder
from moco_jax.models.resnet import ARCHS
from moco_jax.models.resnet import BasicBlock
from moco_jax.models.resnet import BatchNorm
from moco_jax.models.resnet import Bottleneck
from moco_jax.models.resnet import MoCoEncoder
from moco_jax.models.resnet import ProjectionHead
from moco_jax.models.resnet import ResNet
from moco_jax.models.resnet import create_encoder
from moco_jax.models.resnet import head_hidden_dims
from moco_jax.models.vit import VIT_ARCHS
from moco_jax.models.vit import ViT
from moco_jax.models.vit import sincos_position_embedding
