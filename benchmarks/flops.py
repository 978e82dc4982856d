"""The analytic FLOP count of one MoCo train step, from the architecture alone.

A reference written differently from XLA's cost analysis: closed-form
multiply-accumulates of every convolution and dense layer of the ResNet
(torchvision's layout, `moco_jax.models.resnet`), counted from the layer
shapes, not from a traced program. `bench_train.py --compile_only` prints it
beside XLA's count, and tests/test_benchmarks.py keeps the two within a few
percent on the tiny preset, so that a change which adds hidden compute to the
step (a second forward pass, a recomputed encoder, an accidental f32 upcast
that doubles a matmul...) fails a test.

One step, per image (one query view and one key view):
  query encoder forward      2 M          (M = conv + dense MACs of one view)
  query encoder backward     4 M - 2 M_in (gradients w.r.t. weights and inputs;
                                           the first conv needs no input gradient)
  key encoder forward        2 M          (no gradient)
  logits                     4 (K + 1) d  (q.k+ and q.queue forward, and their
                                           gradient w.r.t. q; the queue has none)
  augmentation blur          2 x 4 S^3 C  (two views; two [S, S] x [S, S, C]
                                           matmuls each, computed for every image)
Elementwise work (BatchNorm, ReLU, the optimiser, the EMA) is not counted: it
is what XLA adds on top, and what the tolerance of the test is about.
"""

from typing import NamedTuple

ARCHS = {  # name: (blocks per stage, bottleneck?) as moco_jax.models.resnet.ARCHS.
    'resnet18': ((2, 2, 2, 2), False),
    'resnet34': ((3, 4, 6, 3), False),
    'resnet50': ((3, 4, 6, 3), True),
    'resnet_tiny': ((1, 1, 1, 1), False),
}


class StepFlops(NamedTuple):
  """Analytic FLOPs of one step, per image."""
  forward: float  # One encoder forward of one view (2 x MACs).
  first_conv: float  # Of which the first convolution (no input gradient needed).
  logits: float
  augmentation: float

  @property
  def total(self) -> float:
    backward = 2 * self.forward - self.first_conv
    return self.forward + backward + self.forward + self.logits + self.augmentation


def _out(size: int, kernel: int, stride: int, pad: int) -> int:
  return (size + 2 * pad - kernel) // stride + 1


def _taps(size: int, kernel: int, stride: int, pad: int) -> int:
  """Kernel taps that land inside the input, summed over the outputs of one axis.

  With `exact=False` callers count every tap (torchvision's convention, e.g.
  R50 = 4.1 GMACs); the taps on zero padding are no work, and XLA does not count them.
  """
  return sum(1 for o in range(_out(size, kernel, stride, pad)) for t in range(kernel)
             if 0 <= o * stride - pad + t < size)


def encoder_macs(name: str, width: int, stem: str, image_size: int, head_hidden: tuple,
                 embed_dim: int, exact: bool = True) -> tuple[int, int]:
  """(all MACs, MACs of the first conv) of one forward pass of one image.

  exact: multiply-adds with the input only (taps on zero padding left out);
  False: every tap of every output (the convention of published counts).
  """
  def conv(side, kernel, stride, pad, cin, cout):
    if exact:
      return _taps(side, kernel, stride, pad) ** 2 * cin * cout
    return _out(side, kernel, stride, pad) ** 2 * kernel * kernel * cin * cout

  if name not in ARCHS:
    raise ValueError(f'No analytic count for model {name!r}; known: {sorted(ARCHS)}.')
  stages, bottleneck = ARCHS[name]
  if stem == 'imagenet':
    first = conv(image_size, 7, 2, 3, 3, width)
    side = _out(_out(image_size, 7, 2, 3), 3, 2, 1)  # Max-pool: no MACs.
  else:
    side = image_size
    first = conv(side, 3, 1, 1, 3, width)
  macs, channels = first, width
  for i, blocks in enumerate(stages):
    filters = width * 2 ** i
    out_channels = filters * 4 if bottleneck else filters
    for j in range(blocks):
      stride = 2 if i > 0 and j == 0 else 1
      out_side = _out(side, 3, stride, 1)
      if bottleneck:
        macs += conv(side, 1, 1, 0, channels, filters)
        macs += conv(side, 3, stride, 1, filters, filters)  # Strided here (torchvision v1.5).
        macs += conv(out_side, 1, 1, 0, filters, out_channels)
      else:
        macs += conv(side, 3, stride, 1, channels, filters)
        macs += conv(out_side, 3, 1, 1, filters, filters)
      if stride != 1 or channels != out_channels:
        macs += conv(side, 1, stride, 0, channels, out_channels)  # Projection shortcut.
      side, channels = out_side, out_channels
  dims = (channels,) + tuple(head_hidden) + (embed_dim,)
  macs += sum(a * b for a, b in zip(dims[:-1], dims[1:]))
  return macs, first


def step_flops(name: str, width: int, stem: str, image_size: int, head_hidden: tuple,
               embed_dim: int, queue_size: int, blur: bool = True,
               exact: bool = True) -> StepFlops:
  """The analytic count of one train step, per image (see the module docstring)."""
  macs, first = encoder_macs(name, width, stem, image_size, head_hidden, embed_dim, exact)
  augmentation = 2 * 4 * image_size ** 3 * 3 if blur else 0
  return StepFlops(forward=2.0 * macs, first_conv=2.0 * first,
                   logits=4.0 * (queue_size + 1) * embed_dim, augmentation=float(augmentation))


def config_step_flops(config, exact: bool = True) -> StepFlops:
  """`step_flops` of a training config (config.model, data, moco, aug)."""
  from moco_jax.models import resnet  # pylint: disable=g-import-not-at-top
  model = config.model
  backbone_features = model.width * 2 ** 3 * (4 if ARCHS[model.name][1] else 1)
  return step_flops(model.name, model.width, model.stem, config.data.image_size,
                    resnet.head_hidden_dims(model, backbone_features) if model.head == 'mlp'
                    else (), model.embed_dim, config.moco.queue_size,
                    blur=config.aug.blur_prob > 0, exact=exact)
