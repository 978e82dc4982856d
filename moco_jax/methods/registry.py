"""`config.method` -> the Method class: the one way the loop, checkpoints and checks reach a method."""

from moco_jax.core import errors
from moco_jax.methods import base
from moco_jax.methods import end_to_end
from moco_jax.methods import memory_bank
from moco_jax.methods import moco
from moco_jax.methods import mocov3

METHODS: dict[str, type[base.Method]] = {
    moco.MoCo.name: moco.MoCo,
    mocov3.MoCoV3.name: mocov3.MoCoV3,
    end_to_end.EndToEnd.name: end_to_end.EndToEnd,
    memory_bank.MemoryBank.name: memory_bank.MemoryBank,
}


def method_class(config) -> type[base.Method]:
  """The Method class `config.method` names (default 'moco'), or a ConfigError listing them."""
  name = config.get('method', 'moco')
  if name not in METHODS:
    raise errors.ConfigError(f'config.method={name!r} is not one of {sorted(METHODS)}.')
  return METHODS[name]


def create(config, num_devices: int, num_examples: int = 0) -> base.Method:
  """The method `config` describes, its encoder built for `num_devices` devices.

  `num_examples` is the train split's size (0: unknown, enough for the encoder).
  """
  return method_class(config).from_config(config, num_devices, num_examples)


def check_config(config, num_devices: int) -> None:
  """The chosen method's own config checks (ConfigError naming the field)."""
  method_class(config).check_config(config, num_devices)


def resume_fields(config) -> tuple[str, ...]:
  """'method' and the chosen method's fields whose change a resume must refuse."""
  return ('method',) + method_class(config).resume_fields
