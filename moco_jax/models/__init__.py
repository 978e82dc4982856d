"""Encoders: the ResNet backbone (torchvision layout), BatchNorm modes and the projection head."""

from moco_jax.models.resnet import ARCHS
from moco_jax.models.resnet import BasicBlock
from moco_jax.models.resnet import BatchNorm
from moco_jax.models.resnet import Bottleneck
from moco_jax.models.resnet import MoCoEncoder
from moco_jax.models.resnet import ProjectionHead
from moco_jax.models.resnet import ResNet
from moco_jax.models.resnet import create_backbone
from moco_jax.models.resnet import create_encoder
from moco_jax.models.resnet import head_hidden_dims
