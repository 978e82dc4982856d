"""`config.model` checks: the names the factory knows and the widths it can build."""

import jax

from moco_jax.core import checks
from moco_jax.models import factory
from moco_jax.models import resnet
from moco_jax.models import vit

STEMS = ('imagenet', 'cifar')
HEADS = ('mlp', 'linear')
DTYPES = ('float32', 'bfloat16', 'float64')


def check_config(model) -> None:
  """ConfigError naming the first field of `config.model` that cannot build an encoder."""
  check = lambda field, ok, rule, hint='': checks.check(model, field, ok, rule, hint,
                                                         prefix='config.model.')
  checks.choice(model, 'name', factory.NAMES, prefix='config.model.')
  checks.choice(model, 'stem', STEMS, prefix='config.model.')
  checks.choice(model, 'head', HEADS, prefix='config.model.')
  checks.choice(model, 'dtype', DTYPES, prefix='config.model.')
  checks.require(model.dtype != 'float64' or jax.config.jax_enable_x64,
                 "config.model.dtype='float64' needs JAX_ENABLE_X64=1 in the environment (float64 "
                 'is for numerical checks: XLA:CPU runs it several times slower than float32).')
  check('width', checks.positive_int, 'must be > 0', 'channels of the first stage; torchvision: 64')
  check('embed_dim', checks.positive_int, 'must be > 0', 'the dimension of the keys')
  check('head_hidden_dim', lambda v: checks.integer(v) and (v == -1 or v > 0),
        "must be -1 (the backbone's width) or > 0")
  check('mlp_dim', checks.positive_int, 'must be > 0', 'MoCo v3: 4096')
  check('patch_size', lambda v: checks.integer(v) and (v == -1 or v > 0),
        "must be -1 (the architecture's) or > 0")
  check('stop_grad_conv1', checks.flag, 'must be True or False')
  check('zero_init_residual', checks.flag, 'must be True or False')
  _check_head_dims(model)


def check_resnet(model, method: str) -> None:
  """The methods whose encoder is a ResNet + projection head refuse a ViT name."""
  checks.require(model.name in resnet.ARCHS,
                 f'config.model.name={model.name!r} is not one of {list(resnet.ARCHS)}: '
                 f'config.method={method!r} builds a ResNet encoder (the ViTs '
                 f'{list(vit.VIT_ARCHS)} need --config.method=mocov3).')


def _check_head_dims(model) -> None:
  """head_dims: () (v2's two layers) or positive widths ending in embed_dim, for the MLP head."""
  dims = model.head_dims
  field = f'config.model.head_dims={dims!r}'
  checks.require(isinstance(dims, (list, tuple)),
                 f'{field} must be a list of widths, e.g. --config.model.head_dims="(100, 50, 25)".')
  if not dims:
    return
  field = f'config.model.head_dims={tuple(dims)!r}'
  checks.require(all(checks.positive_int(d) for d in dims),
                 f'{field} must be a list of positive widths (hidden layers, then the output), '
                 'e.g. --config.model.head_dims="(100, 50, 25)".')
  checks.require(model.head == 'mlp',
                 f"{field} needs config.model.head='mlp' (the linear head is one layer of "
                 'embed_dim).')
  checks.require(len(dims) >= 2,
                 f'{field} has no hidden layer: list the hidden widths and the output width, or '
                 'use --config.model.head=linear for a single layer.')
  checks.require(dims[-1] == model.embed_dim,
                 f'{field} ends in {dims[-1]}, but config.model.embed_dim={model.embed_dim} (the '
                 f'dimension of the queue\'s keys): set --config.model.embed_dim={dims[-1]}.')
