"""The Imagenette / Imagewoof MoCo v2 write-up's recipe (Analytics Vidhya, A. Rastogi).

  python main.py --config=configs/writeup.py:imagenette --workdir=DIR \
      --config.data.path=../shared/data/imagenette2-128sq.tgz
  python main.py --config=configs/writeup.py:imagewoof --workdir=DIR   # or --config.data.path=...
  python main.py --mode=linear_eval --config=configs/writeup.py:imagenette --workdir=DIR

The argument after ':' names the dataset (imagenette | imagewoof); everything
else is the write-up's, as it states it:
  * ResNet-18 trained from scratch; the projection head replaces `fc` with
    Linear(512, 100)-ReLU-Linear(100, 50)-ReLU-Linear(50, 25): head_dims
    (100, 50, 25), 25-d keys and queue rows;
  * T = 0.05, queue K = 8192, key momentum m = 0.999, batch 256;
  * lr 0.001 "decreased eventually to 1e-5", weight decay 1e-6. The write-up
    names no optimiser; these are Adam's values (SGD at lr 1e-3 would barely
    move), so optim.name = 'adam' with torch.optim.Adam's L2 weight decay (added
    to the gradient). The decay's shape is not given either: the step schedule
    (x0.1 twice) reaches exactly 1e-5;
  * afterwards the head is dropped and a linear classifier is trained on the
    backbone (`--mode=linear_eval`).
Not stated in the write-up, kept from `configs/imagenette.py`: 128 px inputs,
the aug+ augmentations, 200 epochs with the two lr steps at epochs 120 and 160,
Shuffle BN (the write-up's single-GPU code uses plain BatchNorm:
`--config.moco.bn_mode=local` is that). The write-up trained ~18 GPU hours per
dataset on a Colab GPU and gives no accuracy; expected: not yet measured here.
"""

from configs import imagenette
from configs import imagewoof

_DATASETS = {'imagenette': imagenette, 'imagewoof': imagewoof}


def get_config(dataset: str = 'imagenette'):
  if dataset not in _DATASETS:
    raise ValueError(f'configs/writeup.py:{dataset}: use one of {sorted(_DATASETS)}, e.g. '
                     '--config=configs/writeup.py:imagewoof.')
  config = _DATASETS[dataset].get_config()
  config.model.name = 'resnet18'
  config.model.head = 'mlp'
  config.model.head_dims = (100, 50, 25)
  config.model.embed_dim = 25
  config.moco.temperature = 0.05
  config.moco.queue_size = 8192
  config.moco.momentum = 0.999
  config.batch_size = 256
  config.optim.name = 'adam'
  config.optim.base_lr = 1e-3  # x batch / 256 = 1e-3 at batch 256.
  config.optim.weight_decay = 1e-6
  config.optim.schedule = 'step'  # 1e-3 -> 1e-4 -> 1e-5.
  config.optim.step_epochs = (120, 160)
  config.num_epochs = 200
  return config
