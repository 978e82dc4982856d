"""MoCo v3's recipe (facebookresearch/moco-v3 main_moco.py + CONFIG.md), applied to a config.

Not an experiment by itself: configs/mocov3_r50.py, mocov3_vit_small.py,
mocov3_vit_base.py (the paper's), mocov3_cifar10.py, mocov3_imagenette.py and
configs/tiny.py:mocov3_* call `apply` and then set their model and data.
The recipe table, with the paper's numbers, is in docs/mocov3.md.
"""

from configs import imagenet


def apply(config, family: str):
  """Sets the v3 method, heads, optimiser, schedule and BYOL augmentation of `family`.

  Args:
    config: a `default.get_config()` to change in place.
    family: 'resnet' (LARS, T 1.0, 100 epochs, crop min 0.2) or 'vit' (AdamW,
      T 0.2, 300 epochs, crop min 0.08, frozen patch projection).
  Returns:
    config.
  """
  config.method = 'mocov3'
  config.batch_size = 4096
  config.model.embed_dim = 256  # --moco-dim
  config.model.mlp_dim = 4096  # --moco-mlp-dim
  config.mocov3.momentum = 0.99  # --moco-m
  config.mocov3.momentum_cosine = True  # --moco-m-cos
  config.optim.schedule = 'cosine'  # Linear warm-up, then half-cosine to 0 (adjust_learning_rate).
  # BYOL's augmentation: jitter not strengthened, blur 1.0 / 0.1, solarize 0 / 0.2.
  config.aug.jitter = (0.4, 0.4, 0.2, 0.1)
  config.aug.jitter_prob = 0.8
  config.aug.grayscale_prob = 0.2
  config.aug.blur_prob, config.aug.second_view_blur_prob = 1.0, 0.1
  config.aug.solarize_prob, config.aug.second_view_solarize_prob = 0.0, 0.2
  config.aug.flip = True
  if family == 'resnet':
    config.model.zero_init_residual = True  # main_moco.py builds R50 with it.
    config.mocov3.temperature = 1.0
    config.optim.name = 'lars_mocov3'
    config.optim.base_lr = 0.6  # x batch / 256 (0.3 for 300 / 1000 epochs).
    config.optim.weight_decay = 1e-6
    config.optim.momentum = 0.9
    config.optim.warmup_epochs = 10.0
    config.num_epochs = 100
    config.aug.crop_scale = (0.2, 1.0)
  elif family == 'vit':
    config.model.stop_grad_conv1 = True
    config.mocov3.temperature = 0.2
    config.optim.name = 'adamw'
    config.optim.base_lr = 1.5e-4
    config.optim.weight_decay = 0.1
    config.optim.warmup_epochs = 40.0
    config.num_epochs = 300
    config.aug.crop_scale = (0.08, 1.0)
  else:
    raise ValueError(f"MoCo v3 family {family!r}: expected 'resnet' or 'vit'.")
  return config


def get_config():
  """The R50 recipe on ImageNet (same as configs/mocov3_r50.py)."""
  return on_imagenet('resnet50')


def on_imagenet(model_name: str):
  """The recipe of `model_name`'s family on configs/imagenet.py's data (224 px ImageNet-1k)."""
  config = apply(imagenet.get_config(), 'vit' if model_name.startswith('vit') else 'resnet')
  config.model.name = model_name
  return config
