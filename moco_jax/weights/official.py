"""Official MoCo v1/v2 checkpoints (facebookresearch/moco) as our encoder trees.

`main_moco.py` saves `{'epoch', 'arch', 'state_dict', 'optimizer'}`, where
`state_dict` is the DistributedDataParallel MoCo module's: torchvision ResNet
names under `module.encoder_q.` and `module.encoder_k.`, the head as `fc.*`
(v1: one Linear, `fc.weight` [dim, features]; v2: `fc.0` Linear, ReLU, `fc.2`
Linear), the queue `module.queue` [dim, K] (columns are keys) and
`module.queue_ptr` [1]. The released `moco_v2_800ep_pretrain.pth.tar` is such a
file. `config.init_from=PATH` reads one:

  * a new pretraining run starts from its query and key encoders and its queue
    (`state_from_official`, called by `moco_jax.pretrain`), so it continues
    pretraining the released weights;
  * `--mode=knn|linear_eval|report|export` evaluate its query backbone when
    WORKDIR has no checkpoint (`query_encoder`, called by
    `moco_jax.evaluation.backbone`).

Only `read_checkpoint` needs torch, and it loads with `weights_only=True`: a
downloaded checkpoint is untrusted input, so no pickled code ever runs. The
rest maps plain {name: np.ndarray} dicts onto Flax templates, without torch.
"""

import os
import re

from absl import logging
import jax
import numpy as np

from moco_jax.core import errors
from moco_jax import models
from moco_jax.models import describe
from moco_jax.run import guard
from moco_jax.weights import torchvision_names

ENCODERS = ('encoder_q', 'encoder_k')
TORCH_INSTALL = 'pip install torch --index-url https://download.pytorch.org/whl/cpu'


def _where(path: str) -> str:
  return f'config.init_from={path!r}'


def read_checkpoint(path: str) -> dict:
  """{name: np.ndarray} of the `state_dict` of a PyTorch checkpoint (torch, weights only)."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise errors.CheckpointNotFoundError(
        f'{_where(path)}: no such file. Pass the path of an official MoCo checkpoint (e.g. '
        'moco_v2_800ep_pretrain.pth.tar), or leave init_from empty.')
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.ConfigError(
        f'{_where(path)} is a PyTorch file and reading it needs torch, which is not installed: '
        f'{TORCH_INSTALL} (the CPU build is enough; nothing else uses it).') from e
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.CheckpointError(
        f'{_where(path)} does not load with torch.load(weights_only=True) ({type(e).__name__}: '
        f'{_first_line(e)}): only plain-weights checkpoints are read, never pickled code.') from e
  state = obj.get('state_dict', obj) if isinstance(obj, dict) else None
  if not isinstance(state, dict):
    raise errors.CheckpointError(f'{_where(path)} holds a {type(obj).__name__}, not a '
                                 'checkpoint dict with a state_dict.')
  # float32 NumPy whatever the stored float type (NumPy has no bfloat16).
  arrays = {k: (v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()).numpy()
            for k, v in state.items() if isinstance(v, torch.Tensor)}
  guard.check_finite_weights(arrays, _where(path))
  return arrays


def _first_line(error, limit: int = 200) -> str:
  text = ' '.join(str(error).split())
  return text if len(text) <= limit else text[:limit] + '...'


def split_state_dict(state: dict, path: str = '?') -> dict:
  """{'encoder_q': {torchvision name: array}, 'encoder_k': {...}, 'queue', 'queue_ptr'}.

  Names may carry DDP's 'module.' prefix or not; the queue is returned as ours,
  [K, dim] (the official one is [dim, K]); absent parts are None.
  """
  out = {'encoder_q': {}, 'encoder_k': {}, 'queue': None, 'queue_ptr': None}
  for name, value in state.items():
    bare = name[len('module.'):] if name.startswith('module.') else name
    side, _, rest = bare.partition('.')
    if side in ENCODERS and rest:
      out[side][rest] = np.asarray(value)
    elif bare == 'queue':
      out['queue'] = np.asarray(value).T
    elif bare == 'queue_ptr':
      out['queue_ptr'] = int(np.asarray(value).reshape(-1)[0])
  if not out['encoder_q']:
    found = ', '.join(sorted(state)[:3]) or 'nothing'
    raise errors.CheckpointError(
        f'{_where(path)} has no module.encoder_q.* weights (found {found}, ...): expected a MoCo '
        'pretraining checkpoint of facebookresearch/moco (main_moco.py), not a linear-'
        'classification (main_lincls.py) or torchvision one.')
  if not out['encoder_k']:
    logging.warning('%s has no encoder_k: the key encoder starts as a copy of the query encoder.',
                    _where(path))
    out['encoder_k'] = out['encoder_q']
  return out


def _conv_shapes(tv_state: dict) -> dict:
  """Flat Flax kernel shapes ('layer1_0/conv1/kernel': HWIO) of a torchvision state."""
  out = {}
  for name, value in tv_state.items():
    if name.endswith('.weight') and np.ndim(value) == 4:
      module = re.sub(r'layer(\d+)\.(\d+)\.', r'layer\1_\2/', name[:-len('.weight')])
      module = module.replace('downsample.0', 'downsample_conv').replace('.', '/')
      out[f'{module}/kernel'] = tuple(np.shape(value)[i] for i in (2, 3, 1, 0))
  return out


def backbone_from_official(tv_state: dict, params, batch_stats, model_config, where: str):
  """(params, batch_stats) of the backbone from torchvision-named arrays, or one clear error."""
  try:
    return torchvision_names.backbone_from_torchvision(tv_state, params, batch_stats)
  except (KeyError, ValueError) as e:
    found = describe.describe_backbone(_conv_shapes(tv_state))
    expected = describe.describe_backbone(describe.expected_backbone_shapes(model_config))
    what = f'{e.args[0]} is missing' if isinstance(e, KeyError) else str(e).rstrip('.')
    raise errors.CheckpointError(
        f'{where}: {what}. The file holds a {found} backbone, the config builds a {expected} '
        f'(config.model.name={model_config.name!r}, stem={model_config.stem!r}, '
        f'width={model_config.width}); set --config.model.* to the checkpoint\'s architecture '
        '(official: resnet50, stem imagenet, width 64).') from e


def _torch_head_name(flax_name: str) -> str:
  """'fc' -> 'fc' (v1 Linear); 'fc1' -> 'fc.0', 'fc2' -> 'fc.2' (v2 Sequential with ReLUs)."""
  if flax_name == 'fc':
    return 'fc'
  return f'fc.{2 * (int(flax_name[2:]) - 1)}'


def head_from_official(tv_state: dict, head_params, where: str) -> dict:
  """Our head params ({'fc1': {'kernel', 'bias'}, ...} or {'fc': ...}) from `fc.*` arrays."""
  out = {}
  for name, leaves in head_params.items():
    torch_name = _torch_head_name(name)
    if f'{torch_name}.weight' not in tv_state:
      heads = sorted({k.rsplit('.', 1)[0] for k in tv_state if k.startswith('fc')})
      kind = ('a linear (v1) head: --config.model.head=linear' if heads == ['fc'] else
              f'head layers {heads}: --config.model.head=mlp' if heads else 'no head')
      raise errors.CheckpointError(
          f'{where}: {torch_name}.weight is missing (the config builds a {len(head_params)}-layer '
          f'{"linear" if name == "fc" else "mlp"} head); the file has {kind}.')
    values = {'kernel': np.asarray(tv_state[f'{torch_name}.weight'], np.float32).T,
              'bias': np.asarray(tv_state[f'{torch_name}.bias'], np.float32)}
    for leaf, value in values.items():
      torch_shape, wanted = value.T.shape, tuple(leaves[leaf].shape)[::-1]  # Torch's layout.
      if torch_shape != wanted:
        raise errors.CheckpointError(
            f'{where}: {torch_name}.{"weight" if leaf == "kernel" else "bias"} has shape '
            f'{torch_shape}, the config\'s head needs {wanted}: set --config.model.embed_dim / '
            'head_hidden_dim to the checkpoint\'s (official: 128, and 2048 for v2).')
    out[name] = values
  return out


def encoder_from_official(tv_state: dict, params, batch_stats, model_config, where: str,
                          with_head: bool = True):
  """(params, batch_stats) of one encoder ({'backbone', 'head'}) shaped like the templates."""
  backbone_params, backbone_stats = backbone_from_official(
      tv_state, params['backbone'], batch_stats['backbone'], model_config, where)
  out_params = {'backbone': backbone_params}
  if with_head and 'head' in params:
    out_params['head'] = head_from_official(tv_state, params['head'], where)
  return out_params, {'backbone': backbone_stats}


def queue_from_official(queue, queue_ptr, template_queue, path: str):
  """(queue [K, dim], ptr) checked against our queue's shape, or None if the file has none."""
  if queue is None:
    return None
  if queue.shape != tuple(template_queue.shape):
    raise errors.CheckpointError(
        f'{_where(path)}: module.queue holds {queue.shape[0]} keys of dim {queue.shape[1]}, '
        f'the config builds {template_queue.shape[0]} of dim {template_queue.shape[1]}: set '
        f'--config.moco.queue_size={queue.shape[0]} --config.model.embed_dim={queue.shape[1]}.')
  ptr = 0 if queue_ptr is None else int(queue_ptr) % queue.shape[0]
  return np.asarray(queue, np.float32), ptr


_MOCO_FIELDS = ('key_params', 'key_batch_stats', 'queue', 'queue_ptr')  # methods.moco.MocoState


def state_from_official(state, parts: dict, model_config, path: str = '?'):
  """`state` with the encoders and queue of `parts` (`split_state_dict`); no torch.

  The query encoder goes to `state.params` / `batch_stats`, the key encoder
  and the queue to MoCo's `method_state`. Every replaced leaf keeps the dtype
  and sharding of the leaf it replaces, so the result is laid out exactly as
  `step.init_state` made it (replicated on every device of every process). The
  optimiser state, step and RNG stay fresh.
  """
  host = jax.eval_shape(lambda s: s, state)  # Shapes only: nothing copied to the host.
  if not all(hasattr(host.method_state, f) for f in _MOCO_FIELDS):
    raise errors.ConfigError(
        f'{_where(path)} is a MoCo v1/v2 checkpoint (momentum encoder and queue), but this '
        'run\'s method keeps no such state: use it with --config.method=moco, or evaluate it '
        '(--mode=knn|linear_eval) without pretraining.')
  query = encoder_from_official(parts['encoder_q'], host.params, host.batch_stats,
                                model_config, f'{_where(path)} (module.encoder_q)')
  key = encoder_from_official(parts['encoder_k'], host.method_state.key_params,
                              host.method_state.key_batch_stats, model_config,
                              f'{_where(path)} (module.encoder_k)')
  moco = dict(key_params=key[0], key_batch_stats=key[1])
  queue = queue_from_official(parts['queue'], parts['queue_ptr'], host.method_state.queue, path)
  if queue is not None:
    moco['queue'], moco['queue_ptr'] = queue[0], np.asarray(queue[1], np.int32)
  else:
    logging.warning('%s has no module.queue: the queue starts random, as in a new run.',
                    _where(path))
  place = lambda value, like: jax.tree.map(_like, value, like)
  method_state = state.method_state.replace(
      **{name: place(value, getattr(state.method_state, name)) for name, value in moco.items()})
  logging.info('Initialised the query and key encoders%s from %s.',
               ' and the queue' if queue is not None else '', path)
  return state.replace(params=place(query[0], state.params),
                       batch_stats=place(query[1], state.batch_stats), method_state=method_state)


def _like(value: np.ndarray, like: jax.Array) -> jax.Array:
  """`value` as a global array with `like`'s dtype and sharding (works with many processes)."""
  value = np.asarray(value, like.dtype)
  return jax.make_array_from_callback(like.shape, like.sharding, lambda index: value[index])


def query_encoder(path: str, model_config):
  """(params, batch_stats) of the checkpoint's query backbone, as {'backbone': ...} trees.

  Only the backbone is read, so a v1 (linear head) checkpoint evaluates under
  any config.model.head.
  """
  parts = split_state_dict(read_checkpoint(path), path)
  backbone = models.create_backbone(model_config)
  template = jax.eval_shape(
      lambda: backbone.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32),
                            train=False))
  params, batch_stats = backbone_from_official(
      parts['encoder_q'], template['params'], template['batch_stats'], model_config,
      f'{_where(path)} (module.encoder_q)')
  return {'backbone': params}, {'backbone': batch_stats}
