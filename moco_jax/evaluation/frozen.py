"""Which weights an evaluation reads: a checkpoint's query backbone, released weights, or random init.

`load_backbone` gives the QUERY encoder's backbone (params + BatchNorm running
statistics, no head) of the latest checkpoint of a workdir (or, when it has
none, of the official checkpoint `config.init_from`), or the randomly
initialised encoder the pretraining started from (`config.eval.random_init`,
the floor every result is compared with). What is done with it (features,
export) lives elsewhere: `moco_jax.evaluation.features` runs it.
"""

import functools

from absl import logging
import jax

from moco_jax.methods import registry
from moco_jax import models
from moco_jax.run import checkpoints
from moco_jax.run import guard
from moco_jax.training import state as state_lib
from moco_jax.weights import official


def backbone_variables(params, batch_stats) -> dict:
  """The backbone's variables out of an encoder's (query) params and batch stats."""
  return {'params': params['backbone'], 'batch_stats': batch_stats.get('backbone', {})}


def random_init_encoder(config):
  """(params, batch_stats) of the step-0 trained encoder: the untrained floor.

  `state.initial_encoder_variables`, which `state.create_train_state` uses
  too: the weights pretraining starts from with this config.seed. Compiled as one
  program, as `step.init_state` does: run op by op, a ResNet's initialisers
  dispatch and compile a small program per operation.
  """
  encoder = registry.create(config, num_devices=1).encoder
  init = functools.partial(state_lib.initial_encoder_variables, encoder=encoder,
                           image_size=config.data.image_size,
                           channels=int(config.data.get('channels', 3)))
  return jax.jit(init)(jax.random.PRNGKey(config.seed))


def query_encoder(config, workdir: str):
  """(params, batch_stats, step) of the query encoder to evaluate or export.

  The latest checkpoint of WORKDIR; with none there and config.init_from set,
  the official checkpoint's query backbone (step 0: no step of ours).
  """
  path = config.get('init_from', '')
  if path and not checkpoints.checkpoint_steps(workdir):
    logging.info('No checkpoint in %s: using the query encoder of config.init_from=%s.',
                 checkpoints.checkpoint_dir(workdir), path)
    return (*official.query_encoder(path, config.model), 0)
  if path:
    logging.info('Evaluating the checkpoint in %s, not config.init_from=%s (which only seeds a '
                 'new run, or is evaluated while WORKDIR has no checkpoint).',
                 checkpoints.checkpoint_dir(workdir), path)
  params, batch_stats, step = checkpoints.restore_query_encoder(
      workdir, config.model, channels=int(config.data.get('channels', 3)))
  guard.check_finite_weights({'params': params, 'batch_stats': batch_stats},
                             f'The checkpoint of step {step} in {checkpoints.checkpoint_dir(workdir)}')
  return params, batch_stats, step


def load_backbone(config, workdir: str):
  """(backbone module, backbone variables, step, results key prefix) to evaluate.

  With config.eval.random_init the step-0 encoder (step 0, prefix
  'random_init_'); otherwise the latest checkpoint's query encoder (prefix '').
  """
  backbone = models.create_backbone(config.model)
  if config.eval.random_init:
    params, batch_stats = random_init_encoder(config)
    step, prefix = 0, 'random_init_'
  else:
    params, batch_stats, step = query_encoder(config, workdir)
    prefix = ''
  variables = backbone_variables(params, batch_stats)
  return backbone, jax.device_get(variables), step, prefix
