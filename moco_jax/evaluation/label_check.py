"""kNN and the linear probes need labels: refuse an unlabeled or one-class split before any work.

Self-supervised pretraining needs no labels, so a run on your own images may
have none (`data.labels=none`, a folder without class folders, a list without a
label column: `moco_jax.data.listed`). A kNN vote or a linear probe on such a
split would score nothing (one class: top-1 is trivially 100%), so those modes
stop here, in one line that points to `--mode=embed` (the features themselves)
and `--mode=report` (what the backbone learned, without labels), before
anything is extracted or written.
"""

from typing import Optional

from moco_jax.core import errors
from moco_jax.data import sources


def class_count(data: sources.Source) -> Optional[int]:
  """Classes of the train split from its listing alone (None where that needs decoding)."""
  if data.spec.kind == 'listed' or data.spec.kind == 'folder':
    return len(data.open('train').class_names) if data.streamable else None
  return None


def refusal(num_classes: int, where: str, mode: str) -> errors.DataError:
  what = 'no labels' if num_classes == 0 else 'a single class (top-1 would be 100%)'
  return errors.DataError(
      f'--mode={mode} needs a labelled train split with at least 2 classes, but {where} has '
      f'{what}: use --mode=embed to write its features (WORKDIR/embeddings/) and --mode=report '
      'to look at them, or give labels (class folders, data.labels=csv with a label column).')


def require_labels(config, mode: str) -> None:
  """Raises `refusal` when the train split has fewer than 2 classes (when that is cheap to know)."""
  data = sources.from_config(config)
  count = class_count(data)
  if count is not None and count < 2:
    raise refusal(count, f'data.path={data.spec.path!r}', mode)
