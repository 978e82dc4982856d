"""A .csv / .tsv / .txt list of image paths, with an optional label column (`data.path`).

One image per row; blank rows and rows starting with '#' are skipped. .csv is
comma-separated, .tsv and .txt tab-separated. A first row naming a path column
(`PATH_HEADERS`) is a header, and its label column (`LABEL_HEADERS`) gives the
labels; without a header the first column is the path and a second one, when
every row has it, the label. Every error names the list, the line and the fix.
"""

import csv
import os
from typing import Optional

from moco_jax.core import errors

PATH_HEADERS = ('path', 'file', 'filename', 'image', 'filepath')
LABEL_HEADERS = ('label', 'class', 'target', 'category')


def read_list(path: str, mode: str) -> tuple[list, Optional[list]]:
  """(paths as written, label strings or None) of a list file; errors name the line."""
  if not os.path.isfile(path):
    raise errors.DataNotFoundError(
        f'data.path={path!r} does not exist: set --config.data.path to a .csv/.tsv/.txt list '
        'of image paths (relative to the list), a folder of images or an ImageFolder tree.')
  delimiter = ',' if path.lower().endswith('.csv') else '\t'
  with open(path, newline='', encoding='utf-8') as f:
    rows = [(n, [c.strip() for c in row]) for n, row in enumerate(csv.reader(f, delimiter=delimiter),
                                                                  start=1)
            if row and any(c.strip() for c in row) and not row[0].lstrip().startswith('#')]
  if not rows:
    raise errors.DataError(f'data.path={path!r} lists no images: add one image path per line.')
  header = [c.lower() for c in rows[0][1]]
  path_col = next((header.index(h) for h in PATH_HEADERS if h in header), None)
  if path_col is not None:
    label_col = next((header.index(h) for h in LABEL_HEADERS if h in header), None)
    rows = rows[1:]
  else:
    path_col = 0
    label_col = 1 if rows and all(len(r) > 1 and r[1] for _, r in rows) else None
  if mode == 'csv' and label_col is None:
    raise errors.DataError(
        f'data.labels=csv but data.path={path!r} has no label column (a header with "label", or '
        'a second column on every row): add one, or set --config.data.labels=none.')
  names, labels = [], []
  for line, row in rows:
    if len(row) <= path_col or not row[path_col]:
      raise errors.DataError(f'{path} line {line}: no image path in column {path_col + 1}.')
    names.append(row[path_col])
    if label_col is not None:
      if len(row) <= label_col or not row[label_col]:
        raise errors.DataError(f'{path} line {line}: no label in column {label_col + 1} (every '
                               'row needs one); fix the row or set --config.data.labels=none.')
      labels.append(row[label_col])
  if mode == 'none':
    return names, None
  return names, labels if label_col is not None else None
