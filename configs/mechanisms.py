"""The paper's three mechanisms side by side (MoCo v1 Fig. 2 and 3; MoCo v2 Table 3).

  python main.py --config=configs/mechanisms.py:memory_bank --workdir=DIR \
      --config.data.path=../shared/data/CIFAR-10-images.tar.gz
  python main.py --config=configs/mechanisms.py:end_to_end,imagenette --workdir=DIR \
      --config.data.path=../shared/data/imagenette2-128sq.tgz
  python main.py --config=configs/mechanisms.py:moco,imagenet --workdir=DIR \
      --config.data.data_dir=/path/to/tensorflow_datasets

The argument is `<method>[,<scale>]`: method moco | end_to_end | memory_bank,
scale cifar10_cpu (default: `configs/cifar10_cpu.py`, a tiny ResNet in minutes
on a CPU) | imagenette (`configs/imagenette.py`, ResNet-18 at 128 px) |
imagenet (`configs/mocov1.py`: MoCo v1 on ImageNet, R50, T = 0.07, the setting
of MoCo v1's Fig. 3). Everything but the mechanism is the scale's recipe, so
the three differ only where the paper's do:
  * the temperature T is the scale's `moco.temperature` for all three;
  * the number of negatives K is the scale's `moco.queue_size` for MoCo and
    `memory_bank.num_negatives` for the bank; end-to-end has K = batch_size - 1
    (its dictionary is the batch), at the scale's batch unless overridden
    (`--config.batch_size=1024`, the paper's largest; the lr follows batch / 256);
  * end-to-end uses Shuffle BN like MoCo (MoCo v1 Sec. 3.3), the bank per-device
    BatchNorm (its positive is a bank row, nothing to leak).
"""

from configs import cifar10_cpu
from configs import imagenette
from configs import mocov1

_SCALES = {'cifar10_cpu': cifar10_cpu, 'imagenette': imagenette, 'imagenet': mocov1}
_METHODS = ('moco', 'end_to_end', 'memory_bank')


def get_config(arg: str = 'moco'):
  method, _, scale = arg.partition(',')
  scale = scale or 'cifar10_cpu'
  if method not in _METHODS or scale not in _SCALES:
    raise ValueError(f'configs/mechanisms.py:{arg}: use <method>[,<scale>] with method in '
                     f'{list(_METHODS)} and scale in {sorted(_SCALES)}, e.g. '
                     '--config=configs/mechanisms.py:memory_bank,imagenette.')
  config = _SCALES[scale].get_config()
  config.method = method
  config.end_to_end.temperature = config.moco.temperature
  config.end_to_end.bn_mode = 'shuffle'
  config.end_to_end.bn_splits = config.moco.bn_splits
  config.memory_bank.temperature = config.moco.temperature
  config.memory_bank.num_negatives = config.moco.queue_size
  return config
