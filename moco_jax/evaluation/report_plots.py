"""The pictures of a run report, from plain arrays (no JAX, no checkpoints).

matplotlib draws the plots (through `matplotlib.figure.Figure`, which renders
with Agg and touches no global pyplot state) and Pillow the image grids.
matplotlib is imported by the functions that draw: main.py imports this module
for every mode, and only a report draws (the start-up it saves: docs/architecture.md,
"Testing"). Each function writes one PNG of a fixed pixel size, the same for any
dataset, so a report reads the same for CIFAR-10 at 32 px and Imagenette at 128 px; the
sizes are module constants that the tests check. `moco_jax.evaluation.report` gathers
the arrays and writes the HTML page around these pictures.
"""

from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DPI = 100
CURVES_SIZE = (1100, 750)  # Pixels (width, height) of curves.png.
TSNE_SIZE = (1400, 640)
CONFUSION_SIZE = (820, 740)

# metrics.jsonl key -> panel title; the x axis is the row's epoch.
CURVES = (
    ('train_loss', 'train loss (InfoNCE)'),
    ('contrastive_acc', 'contrastive accuracy (positive key ranked first)'),
    ('learning_rate', 'learning rate'),
    ('knn_top1', 'kNN top-1 (%) on the eval split'),
)

# Image grids: every image is shown as a TILE x TILE square with a caption under it.
TILE = 96
CAPTION = 16
PAD = 6
HEADER = 20  # Height of the column titles.
ROW_LABEL = 64  # Width of the row titles (when there are any).
GAP = 14  # Extra space after the first column (the query of a neighbour row).
RIGHT = (0, 130, 0)
WRONG = (210, 0, 0)
TEXT = (20, 20, 20)


def display_rgb(images) -> np.ndarray:
  """uint8 [..., 3] to draw images of any channel count: gray repeated, C > 3 its first three."""
  images = np.asarray(images)
  channels = images.shape[-1]
  if channels == 3:
    return images
  if channels == 1:
    return np.repeat(images, 3, axis=-1)
  if channels == 2:
    return np.concatenate([images, np.zeros_like(images[..., :1])], axis=-1)
  return np.ascontiguousarray(images[..., :3])


def _figure(size):
  """A matplotlib Figure of `size` pixels."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  return Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout='constrained')


def class_colors(num_classes: int) -> np.ndarray:
  """[num_classes, 4] RGBA: tab10 up to 10 classes, tab20 up to 20, then evenly spaced turbo."""
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  if num_classes <= 10:
    return colormaps['tab10'](np.arange(num_classes))
  if num_classes <= 20:
    return colormaps['tab20'](np.arange(num_classes))
  return colormaps['turbo'](np.linspace(0.0, 1.0, num_classes))


# --------------------------------------------------------------------------
# Plots.


def plot_curves(rows: Sequence[dict], path: str, title: str = ''):
  """Train loss, contrastive accuracy, lr and kNN top-1 against epoch, 2 x 2 panels.

  Args:
    rows: metrics.jsonl rows ({'step', 'epoch', 'train_loss', ...}); a row
      without `epoch` is placed at its step, and a metric no row has gets an
      empty panel that says so.
    path: the PNG to write (CURVES_SIZE pixels).
    title: the figure's title (the workdir, say).
  """
  fig = _figure(CURVES_SIZE)
  axes = fig.subplots(2, 2).ravel()
  have_epochs = any('epoch' in r for r in rows)
  for ax, (key, name) in zip(axes, CURVES):
    points = sorted((r.get('epoch', r['step']), r[key]) for r in rows
                    if key in r and r[key] is not None)
    ax.set_title(name, fontsize=11)
    ax.set_xlabel('epoch' if have_epochs else 'step')
    ax.grid(True, alpha=0.3)
    if not points:
      ax.text(0.5, 0.5, f'no {key} in metrics.jsonl', ha='center', va='center',
              transform=ax.transAxes, color='gray')
      continue
    x, y = np.asarray(points, dtype=np.float64).T
    marker = 'o' if key == 'knn_top1' or len(x) < 30 else None
    ax.plot(x, y, marker=marker, markersize=4, linewidth=1.5)
    if key == 'knn_top1':
      ax.annotate(f'{y[-1]:.2f}', (x[-1], y[-1]), textcoords='offset points', xytext=(-8, -4),
                  ha='right', va='top')
    if (key == 'learning_rate' and np.all(y > 0) and y.max() / y.min() > 50
        and len(np.unique(y)) <= 10):
      ax.set_yscale('log')  # Step schedules over decades (1e-3 -> 1e-5); cosine stays linear.
  if title:
    fig.suptitle(title, fontsize=12)
  fig.savefig(path, dpi=DPI)


def plot_tsne(panels: Sequence[tuple], labels: np.ndarray, class_names: Sequence[str], path: str):
  """2-d embeddings side by side, one point per image, coloured by class.

  Args:
    panels: (title, points [N, 2]) pairs, e.g. the trained and the random-init encoder;
      all of the same N images, in the order of `labels`.
    labels: int [N] class of each point.
    class_names: the legend's names, indexed by label.
    path: the PNG to write (TSNE_SIZE pixels).
  """
  fig = _figure(TSNE_SIZE)
  axes = np.atleast_1d(fig.subplots(1, len(panels)))
  colors = class_colors(len(class_names))
  labels = np.asarray(labels)
  size = float(np.clip(8000 / max(len(labels), 1), 4, 40))  # Points shrink as they multiply.
  for ax, (title, points) in zip(axes, panels):
    points = np.asarray(points)
    for c, name in enumerate(class_names):
      mine = labels == c
      ax.scatter(points[mine, 0], points[mine, 1], s=size, color=colors[c], label=name,
                 linewidths=0, alpha=0.85)
    ax.set_title(title, fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])
  handles, names = axes[0].get_legend_handles_labels()
  fig.legend(handles, names, loc='outside right center', markerscale=max(1.0, 6 / size ** 0.5), fontsize=10,
             frameon=False)
  fig.savefig(path, dpi=DPI)


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: str, title: str = ''):
  """The confusion matrix (rows: true class, columns: predicted), counts in the cells.

  Colours are row-normalised (the fraction of each true class), so a small
  class reads as clearly as a large one; up to 20 classes show their counts.
  """
  matrix = np.asarray(matrix)
  fig = _figure(CONFUSION_SIZE)
  ax = fig.subplots()
  fractions = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
  image = ax.imshow(fractions, cmap='Blues', vmin=0.0, vmax=1.0)
  n = len(class_names)
  ax.set_xticks(range(n), class_names, rotation=45, ha='right', rotation_mode='anchor')
  ax.set_yticks(range(n), class_names)
  ax.set_xlabel('predicted class')
  ax.set_ylabel('true class')
  if n <= 20:
    for i in range(n):
      for j in range(n):
        ax.text(j, i, str(int(matrix[i, j])), ha='center', va='center', fontsize=8,
                color='white' if fractions[i, j] > 0.5 else 'black')
  fig.colorbar(image, ax=ax, label='fraction of the true class', shrink=0.8)
  if title:
    ax.set_title(title, fontsize=11)
  fig.savefig(path, dpi=DPI)


# --------------------------------------------------------------------------
# Image grids (Pillow).


def grid_size(num_rows: int, num_cols: int, row_labels: bool, gap: bool) -> tuple:
  """(width, height) in pixels of `tile_grid` with these dimensions."""
  width = (ROW_LABEL if row_labels else 0) + PAD + num_cols * (TILE + PAD) + (GAP if gap else 0)
  height = HEADER + PAD + num_rows * (TILE + CAPTION + PAD)
  return width, height


def _font(size: int = 11):
  return ImageFont.load_default(size=size)


def _tile(image: np.ndarray) -> Image.Image:
  """A uint8 [H, W, 3] image as a TILE x TILE square: pixels kept sharp when enlarged."""
  pil = Image.fromarray(np.asarray(image, np.uint8))
  resample = Image.Resampling.NEAREST if max(pil.size) < TILE else Image.Resampling.BICUBIC
  return pil.resize((TILE, TILE), resample)


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
  """`text` shortened with '..' until it fits in `width` pixels."""
  while text and draw.textlength(text, font=font) > width:
    text = text[:-3] + '..' if len(text) > 3 else text[:-1]
  return text


def tile_grid(rows: Sequence[Sequence[tuple]], header: Sequence[str],
              row_labels: Optional[Sequence[str]] = None, gap: bool = False) -> Image.Image:
  """A grid of captioned image tiles.

  Args:
    rows: rows of cells (image uint8 [H, W, 3], caption, color), color one of
      TEXT, RIGHT, WRONG; a WRONG cell also gets a red frame.
    header: a title over each column.
    row_labels: a title left of each row, or None.
    gap: leave extra space after the first column.

  Returns:
    The grid, `grid_size(len(rows), len(rows[0]), row_labels is not None, gap)` pixels.
  """
  num_cols = len(rows[0])
  canvas = Image.new('RGB', grid_size(len(rows), num_cols, row_labels is not None, gap), 'white')
  draw = ImageDraw.Draw(canvas)
  font, bold = _font(11), _font(12)
  left = (ROW_LABEL if row_labels is not None else 0) + PAD

  def x_of(col):
    return left + col * (TILE + PAD) + (GAP if gap and col > 0 else 0)

  for col, title in enumerate(header):
    draw.text((x_of(col) + TILE / 2, HEADER / 2 + 2), _fit(draw, title, TILE, bold), fill=TEXT,
              font=bold, anchor='mm')
  for r, cells in enumerate(rows):
    y = HEADER + PAD + r * (TILE + CAPTION + PAD)
    if row_labels is not None:
      draw.text((PAD, y + TILE / 2), _fit(draw, row_labels[r], ROW_LABEL - PAD, bold), fill=TEXT,
                font=bold, anchor='lm')
    for col, (image, caption, color) in enumerate(cells):
      x = x_of(col)
      canvas.paste(_tile(image), (x, y))
      if color == WRONG:
        draw.rectangle([x, y, x + TILE - 1, y + TILE - 1], outline=WRONG, width=3)
      draw.text((x + TILE / 2, y + TILE + CAPTION / 2 + 1), _fit(draw, caption, TILE, font),
                fill=color, font=font, anchor='mm')
  return canvas


def neighbour_grid(query_images, query_labels, neighbour_images, neighbour_labels,
                   similarities, class_names: Sequence[str], path: str):
  """Each eval image (first column) with its nearest train images, wrong labels in red.

  Args:
    query_images: uint8 [Q, H, W, 3] eval images; query_labels: int [Q].
    neighbour_images: uint8 [Q, k, H, W, 3], nearest first; neighbour_labels: int [Q, k].
    similarities: [Q, k] cosine similarities, printed under each neighbour.
    class_names: names indexed by label.
    path: the PNG to write (`grid_size(Q, k + 1, False, True)` pixels).
  """
  rows = []
  for q in range(len(query_images)):
    cells = [(query_images[q], class_names[query_labels[q]], TEXT)]
    for j in range(neighbour_images.shape[1]):
      label = neighbour_labels[q, j]
      right = label == query_labels[q]
      caption = f'{class_names[label]} {similarities[q, j]:.2f}'
      cells.append((neighbour_images[q, j], caption, RIGHT if right else WRONG))
    rows.append(cells)
  header = ['eval image'] + [f'#{j + 1}' for j in range(neighbour_images.shape[1])]
  tile_grid(rows, header, gap=True).save(path)


def augmentation_grid(images, query_views, key_views, labels, class_names: Sequence[str],
                      path: str):
  """Three rows: the decoded train images, their query views and their key views.

  Args:
    images: uint8 [B, S, S, 3] train images as the step receives them.
    query_views, key_views: uint8 [B, size, size, 3] (normalisation undone).
    labels: int [B]; class_names: names indexed by label.
    path: the PNG to write (`grid_size(3, B, True, False)` pixels).
  """
  count = len(images)
  rows = [[(images[i], class_names[labels[i]], TEXT) for i in range(count)],
          [(query_views[i], 'query', TEXT) for i in range(count)],
          [(key_views[i], 'key', TEXT) for i in range(count)]]
  header = [f'example {i}' for i in range(count)]
  tile_grid(rows, header, row_labels=['image', 'query', 'key']).save(path)
