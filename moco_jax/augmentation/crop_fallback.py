"""RandomResizedCrop's fallback box, shared by the device crop and the host crop.

Pure Python (no JAX, no NumPy arrays): the streaming loader's worker processes
import it without JAX, and `image_ops` uses it at trace time (static shapes).
"""


def fallback_box(height: int, width: int, ratio) -> tuple[int, int, int, int]:
  """(top, left, h, w): the whole image trimmed to the nearest allowed ratio, centred.

  What torchvision's RandomResizedCrop.get_params returns when none of its 10
  draws fits the image.
  """
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, round(width / ratio[0])
  elif in_ratio > ratio[1]:
    w, h = round(height * ratio[1]), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w
