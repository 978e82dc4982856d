"""What a run learned, in pictures: WORKDIR/report/index.html (`--mode=report`).

The report restores the query backbone of the latest checkpoint of WORKDIR
(a finished or an interrupted run: whatever was saved last) and writes, next
to an offline HTML page, one PNG per question a researcher asks of a
self-supervised run:

  curves.png         did it train? loss, contrastive accuracy, lr and kNN top-1
                     against epoch, from metrics.jsonl;
  tsne.png           do classes separate? t-SNE of eval-split features, coloured
                     by class, beside the same for the random-init encoder;
  neighbours.png     what does the encoder find similar? 16 eval images with
                     their 8 nearest train images (cosine), wrong labels in red;
  augmentations.png  what does the network see? 8 train images of step
                     `config.report.augment_step` with their query and key
                     views, made by `augment.two_views` with the train step's
                     own random numbers, normalisation undone;
  confusion.png      which classes does the kNN vote confuse?

An unlabeled run (`data.labels=none`, a folder without class folders) gets the
same page without what needs labels: one colour in the t-SNE, neighbours
without right/wrong frames, no kNN or confusion matrix; with no eval split
(`data.val_fraction=0`) the queries and t-SNE points are train images (the
query itself left out of its neighbours).

and the run's config (WORKDIR/config.json) and eval.json figures as tables.
Features are those of the kNN evaluation (`features.extract_features`: eval view,
inference-mode BatchNorm, no head, L2-normalised). The arrays are gathered here
and drawn by `moco_jax.evaluation.report_plots`.
"""

import dataclasses
import functools
import html
import json
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moco_jax.augmentation import augment
from moco_jax.core import errors
from moco_jax.core import files
from moco_jax.core import parallel
from moco_jax.data import batching
from moco_jax.data.dataset import ImageDataset
from moco_jax.data import eval_reader
from moco_jax.data import sources
from moco_jax.evaluation import features
from moco_jax.evaluation import frozen
from moco_jax.evaluation import knn
from moco_jax.evaluation import report_plots
from moco_jax.evaluation import results
from moco_jax import models
from moco_jax.training import state as state_lib

REPORT_DIR = 'report'
NUM_QUERIES = 16  # Eval images of the neighbour grid.
NUM_NEIGHBOURS = 8  # Train images shown per eval image.
NUM_AUGMENTED = 8  # Train images of the augmentation preview.
PICTURES = ('curves.png', 'tsne.png', 'neighbours.png', 'augmentations.png', 'confusion.png')


# --------------------------------------------------------------------------
# Gathering the arrays.


def read_metrics(workdir: str) -> list:
  """The rows of WORKDIR/metrics.jsonl ([] if none); a torn last line is skipped."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except ValueError:
        logging.warning('Skipping an unreadable line of %s (a run killed mid-write?).', path)
  return rows


def augmentation_preview(config, train_ds: ImageDataset, step: int,
                         count: int = NUM_AUGMENTED):
  """The first `count` images of train batch `step` and the two views the train step makes.

  The batch comes from `batching.train_indices` (what the loop feeds at
  `step`), the views from `train.augment_views`' own derivation: the step's
  key folded from the run's rng, split into (augmentation, shuffle), and
  example ids = positions in the global batch. They are therefore exactly the
  views of the first `count` examples of that step, on any number of devices.

  Returns:
    (images uint8 [count, S, S, 3], labels [count], query views uint8, key views uint8).
  """
  count = min(count, config.batch_size)
  idx = batching.train_indices(len(train_ds), config.batch_size, config.seed, step)[:count]
  images = train_ds.images[idx]
  aug_rng, _ = state_lib.step_rngs(state_lib.run_rng(config.seed), step)
  views_fn = jax.jit(functools.partial(augment.two_views, aug_config=config.aug,
                                       image_size=config.data.image_size))
  query, key = views_fn(aug_rng, jnp.asarray(images), jnp.arange(count, dtype=jnp.int32))
  return images, train_ds.labels[idx], _to_uint8(query, config.aug), _to_uint8(key, config.aug)


def _to_uint8(views, aug_config) -> np.ndarray:
  """Normalised float views back to displayable uint8 pixels."""
  mean = np.asarray(aug_config.mean, np.float32)
  std = np.asarray(aug_config.std, np.float32)
  pixels = np.asarray(views, np.float32) * std + mean
  return np.round(np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8)


def pick_queries(labels: np.ndarray, count: int = NUM_QUERIES, seed: int = 0) -> np.ndarray:
  """`count` eval indices, classes taken in turn, each class's images in a fixed random order."""
  order = np.random.default_rng(seed).permutation(len(labels))
  by_class = [list(order[labels[order] == c]) for c in np.unique(labels)]
  picked = []
  while len(picked) < min(count, len(labels)):
    for members in by_class:
      if members and len(picked) < count:
        picked.append(members.pop(0))
  return np.asarray(picked, np.int64)


def nearest_neighbours(query_features: np.ndarray, bank: np.ndarray, k: int):
  """(indices [Q, k], cosine similarities [Q, k]) of the most similar rows of `bank`."""
  similarities = np.asarray(query_features, np.float32) @ np.asarray(bank, np.float32).T
  k = min(k, bank.shape[0])
  idx = np.argsort(-similarities, axis=1, kind='stable')[:, :k]
  return idx, np.take_along_axis(similarities, idx, axis=1)


def tsne_2d(features: np.ndarray, seed: int = 0) -> np.ndarray:
  """scikit-learn's t-SNE of L2-normalised features (PCA init, perplexity <= 30)."""
  num = features.shape[0]
  perplexity = float(min(30.0, max(1.0, (num - 1) / 3)))
  # Imported here: scikit-learn is slow to import, and every main.py run imports this module.
  from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top
  tsne = TSNE(n_components=2, perplexity=perplexity, init='pca', learning_rate='auto',
              random_state=seed, method='exact' if num <= 200 else 'barnes_hut')
  return tsne.fit_transform(np.asarray(features, np.float32))


def tsne_subset(num: int, wanted: int, seed: int = 0) -> np.ndarray:
  """Sorted indices of `wanted` eval images (all if wanted <= 0 or >= num)."""
  if wanted <= 0 or wanted >= num:
    return np.arange(num)
  return np.sort(np.random.default_rng(seed).choice(num, wanted, replace=False))


# --------------------------------------------------------------------------
# The report.


def run_report(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes WORKDIR/report/{index.html, *.png} for the latest checkpoint; returns the page's path.

  Without a checkpoint yet (a run stopped before its first save), the curves,
  the augmentation preview and the random-init t-SNE are still written and the
  page says what is missing. A split larger than `data.max_in_memory_gb`
  (a streamed run) is replaced by a fixed random subset that fits
  (`eval_reader.bounded_split`; the log and the page say how many): the
  neighbours, confusion matrix and preview are then those of the subset.
  """
  start = time.perf_counter()
  out_dir = os.path.join(workdir, REPORT_DIR)
  writing = jax.process_index() == 0  # Every process extracts features; process 0 draws.
  if writing:  # The page's path first: a refusal after the pictures would leave them behind.
    files.check_file(os.path.join(out_dir, 'index.html'), 'the report')
    files.make_dir(out_dir, 'the report')
  data = sources.from_config(config)
  train_ds = eval_reader.bounded_split(data, 'train', 'Report')
  labelled = bool(train_ds.class_names)
  try:
    eval_ds = eval_reader.bounded_split(data, 'eval', 'Report')
  except errors.DataError as e:  # No eval split (your own images without a held-out part).
    logging.info('Report: %s Using train images as the queries and t-SNE points.', e)
    eval_ds = train_ds
  if labelled:
    class_names = _class_names(train_ds, eval_ds)
  else:  # One pseudo-class: one colour, no right/wrong frames.
    class_names = ['unlabeled']
    same = eval_ds is train_ds
    train_ds = dataclasses.replace(train_ds, labels=np.zeros_like(train_ds.labels), num_classes=1,
                                   class_names=class_names)
    eval_ds = train_ds if same else dataclasses.replace(
        eval_ds, labels=np.zeros_like(eval_ds.labels), num_classes=1, class_names=class_names)
  backbone = models.create_backbone(config.model)
  extract = functools.partial(features.extract_features, config, backbone,
                              mesh=parallel.make_mesh())
  facts = {'workdir': os.path.abspath(workdir), 'train images': len(train_ds),
           'eval images': len(eval_ds) if eval_ds is not train_ds else 'none (train images used)',
           'classes': len(class_names) if labelled else 'none (unlabeled)'}
  subset = tsne_subset(len(eval_ds), config.report.tsne_points)
  facts['t-SNE points'] = len(subset)
  drawn, panels = [], []

  try:
    params, batch_stats, step = frozen.query_encoder(config, workdir)
  except FileNotFoundError as e:
    logging.warning('%s The report shows the curves, the augmentations and the random-init '
                    'encoder only.', e)
  else:
    epoch = round(step / max(len(train_ds) // config.batch_size, 1), 2)
    facts.update({'checkpoint step': step, 'checkpoint epoch': epoch})
    variables = jax.device_get(frozen.backbone_variables(params, batch_stats))
    train_features = extract(variables, train_ds)
    eval_features = train_features if eval_ds is train_ds else extract(variables, eval_ds)
    if writing:
      facts.update(_draw_checkpoint(config, train_ds, eval_ds, class_names, train_features,
                                    eval_features, step, out_dir, labelled))
      drawn += ['neighbours.png', 'confusion.png'] if labelled else ['neighbours.png']
      panels.append((f'MoCo, step {step} (epoch {epoch:g})', tsne_2d(eval_features[subset])))

  # The weights of --mode=knn's random_init_* floor (eager: the ops are shared with it and cached).
  random_init = frozen.backbone_variables(*frozen.random_init_encoder(config))
  random_features = extract(random_init, eval_ds)
  images, labels, query_views, key_views = augmentation_preview(config, train_ds,
                                                                config.report.augment_step)
  if writing:
    panels.append(('random-init encoder (step 0)', tsne_2d(random_features[subset])))
    report_plots.plot_tsne(panels, eval_ds.labels[subset], class_names,
                           os.path.join(out_dir, 'tsne.png'))
    report_plots.plot_curves(read_metrics(workdir), os.path.join(out_dir, 'curves.png'),
                             os.path.abspath(workdir))
    report_plots.augmentation_grid(report_plots.display_rgb(images), report_plots.display_rgb(query_views),
                                   report_plots.display_rgb(key_views), labels, class_names,
                                   os.path.join(out_dir, 'augmentations.png'))
    drawn += ['curves.png', 'tsne.png', 'augmentations.png']
    facts['report time (s)'] = round(time.perf_counter() - start, 1)
    page = render_html(facts, _run_config(config, workdir), results.read_results(workdir),
                       [p for p in PICTURES if p in drawn], config.report.augment_step)
    files.atomic_write(os.path.join(out_dir, 'index.html'), lambda f: f.write(page))
  logging.info('Wrote the report of %s to %s in %.1f s.', workdir, out_dir,
               time.perf_counter() - start)
  return os.path.join(out_dir, 'index.html')


def _draw_checkpoint(config, train_ds, eval_ds, class_names, train_features, eval_features,
                     step: int, out_dir: str, labelled: bool = True) -> dict:
  """neighbours.png and confusion.png of a checkpoint's features; returns its kNN facts."""
  if not labelled:
    queries = pick_queries(eval_ds.labels)
    same = eval_ds is train_ds  # A query is its own nearest neighbour: leave it out.
    neighbours, similarities = nearest_neighbours(eval_features[queries], train_features,
                                                  NUM_NEIGHBOURS + int(same))
    if same:
      neighbours, similarities = _without_self(queries, neighbours, similarities)
    report_plots.neighbour_grid(
        report_plots.display_rgb(eval_ds.images[queries]), eval_ds.labels[queries],
        report_plots.display_rgb(train_ds.images[neighbours]),
        train_ds.labels[neighbours], similarities, class_names,
        os.path.join(out_dir, 'neighbours.png'))
    return {}
  num_classes = len(class_names)
  scores = knn.knn_scores(train_features, train_ds.labels, eval_features, num_classes,
                          config.eval.knn_k, config.eval.knn_temperature)
  predictions = np.argmax(scores, axis=1)
  top1 = round(float(100.0 * np.mean(predictions == eval_ds.labels)), 2)
  queries = pick_queries(eval_ds.labels)
  neighbours, similarities = nearest_neighbours(eval_features[queries], train_features,
                                                NUM_NEIGHBOURS)
  report_plots.neighbour_grid(
      report_plots.display_rgb(eval_ds.images[queries]), eval_ds.labels[queries],
      report_plots.display_rgb(train_ds.images[neighbours]),
      train_ds.labels[neighbours], similarities, class_names,
      os.path.join(out_dir, 'neighbours.png'))
  from sklearn.metrics import confusion_matrix  # pylint: disable=g-import-not-at-top
  matrix = confusion_matrix(eval_ds.labels, predictions, labels=np.arange(num_classes))
  k = min(config.eval.knn_k, len(train_ds))
  report_plots.plot_confusion(matrix, class_names, os.path.join(out_dir, 'confusion.png'),
                              f'kNN (k={k}, t={config.eval.knn_temperature}), step {step}: '
                              f'top-1 {top1:.2f} %')
  return {'kNN top-1 (%) now': top1, 'kNN k / t': f'{k} / {config.eval.knn_temperature}'}


def _without_self(queries, neighbours, similarities):
  """Drops each query's own index from its neighbour row (keeping the row length - 1)."""
  keep = neighbours != queries[:, None]
  keep[keep.sum(axis=1) > neighbours.shape[1] - 1, -1] = False  # Self not found: drop the last.
  width = neighbours.shape[1] - 1
  return (neighbours[keep].reshape(-1, width), similarities[keep].reshape(-1, width))


def _class_names(train_ds, eval_ds) -> list:
  num = max(train_ds.num_classes, eval_ds.num_classes)
  names = list(train_ds.class_names or eval_ds.class_names or [])
  return [str(n) for n in names[:num]] + [str(c) for c in range(len(names), num)]


def _run_config(config, workdir: str) -> tuple:
  """(source, JSON text) of the run's config: WORKDIR/config.json, else the one given."""
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    with open(path) as f:
      return path, f.read()
  return 'the --config of this report (the run wrote no config.json)', config.to_json_best_effort(
      indent=2, sort_keys=True)


# --------------------------------------------------------------------------
# HTML.

_CAPTIONS = {
    'curves.png': ('Training curves',
                   'From metrics.jsonl: the InfoNCE loss and the share of queries whose positive key '
                   'beats every queued negative, the learning rate, and the kNN monitor.'),
    'tsne.png': ('t-SNE of eval-split features',
                 'Backbone features (no head, L2-normalised) of the eval images, coloured by their '
                 'class, for this checkpoint and for the random-init encoder the run started from.'),
    'neighbours.png': ('Nearest train images',
                       'Each row: an eval image, then its 8 most cosine-similar train images with '
                       'their label and similarity; a red frame and label mark a class different '
                       'from the eval image\'s.'),
    'augmentations.png': ('Augmentations',
                          'The first train images of one step as decoded, then the query and key '
                          'views the train step makes of them (augment.two_views with the step\'s '
                          'own random numbers), normalisation undone.'),
    'confusion.png': ('kNN confusion matrix',
                      'Rows: true class; columns: the kNN vote; colour: fraction of the row.'),
}


def _table(items) -> str:
  rows = ''.join(f'<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>'
                 for k, v in items)
  return f'<table>{rows}</table>'


def render_html(facts: dict, run_config: tuple, results: dict, pictures: list,
                augment_step: int) -> str:
  """The offline page: facts, eval.json, the pictures and the run's config; no external files."""
  sections = []
  for name in pictures:
    title, caption = _CAPTIONS[name]
    if name == 'augmentations.png':
      caption += f' Step {augment_step}.'
    sections.append(f'<h2>{html.escape(title)}</h2><p>{html.escape(caption)}</p>'
                    f'<img src="{name}" alt="{html.escape(title)}">')
  missing = [n for n in PICTURES if n not in pictures]
  if missing:
    sections.append('<p class="note">Not drawn (no checkpoint in this workdir yet): '
                    f'{html.escape(", ".join(missing))}.</p>')
  results_html = (_table(sorted(results.items())) if results else
                  '<p>No eval.json yet: run <code>--mode=knn</code> or '
                  '<code>--mode=linear_eval</code>.</p>')
  source, config_text = run_config
  return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>MoCo report: {html.escape(facts['workdir'])}</title>
<style>
body {{ font-family: sans-serif; max-width: 1450px; margin: 1em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0; }}
th, td {{ border: 1px solid #ccc; padding: 2px 8px; text-align: left; font-weight: normal; }}
th {{ background: #f4f4f4; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
pre {{ background: #f7f7f7; padding: 0.5em; font-size: 12px; max-height: 40em; overflow: auto; }}
.note {{ color: #a00; }}
</style></head><body>
<h1>MoCo run report</h1>
{_table(facts.items())}
<h2>eval.json</h2>
<p>Accuracies in percent; <code>random_init_*</code> rows are the step-0 encoder (the floor).</p>
{results_html}
{''.join(sections)}
<h2>Config</h2><p>From {html.escape(source)}.</p>
<pre>{html.escape(config_text)}</pre>
</body></html>
"""
