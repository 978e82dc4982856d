"""kNN top-1 of `--mode=embed` files against labels the run never saw (a check of an unlabeled run).

  python tools/knn_from_embeddings.py DIR [--k 200] [--t 0.1]

Reads DIR/embeddings/{train,eval}.npy and their index files, takes each image's
hidden label from the name of the folder it sits in (an unlabeled copy of an
ImageFolder tree: .../<class>/<image>), and scores the weighted kNN vote of
InstDisc / the MoCo kNN monitor (cosine similarity of L2-normalised float32
rows, the k most similar train rows vote with weight exp(sim / t)). NumPy
only, written apart from moco_jax/evaluation/knn.py. Prints one JSON line.
"""

import argparse
import csv
import json
import os

import numpy as np


def load(workdir: str, split: str):
  base = os.path.join(workdir, 'embeddings', split)
  rows = np.load(base + '.npy', mmap_mode='r')
  with open(base + '.index.csv') as f:
    index = list(csv.DictReader(f))
  keep = np.asarray([r['readable'] == '1' for r in index])
  labels = [os.path.basename(os.path.dirname(r['path'])) for r in index]
  x = np.asarray(rows, np.float32)[keep]
  x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  return x, [l for l, k in zip(labels, keep) if k]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('workdir')
  parser.add_argument('--k', type=int, default=200)
  parser.add_argument('--t', type=float, default=0.1)
  args = parser.parse_args()
  train, train_names = load(args.workdir, 'train')
  queries, query_names = load(args.workdir, 'eval')
  classes = sorted(set(train_names))
  number = {c: i for i, c in enumerate(classes)}
  train_labels = np.asarray([number[n] for n in train_names])
  query_labels = np.asarray([number.get(n, -1) for n in query_names])
  k = min(args.k, len(train))
  correct = 0
  for start in range(0, len(queries), 256):
    sim = queries[start:start + 256] @ train.T
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    weights = np.exp(np.take_along_axis(sim, top, axis=1) / args.t)
    scores = np.zeros((len(top), len(classes)))
    np.add.at(scores, (np.arange(len(top))[:, None], train_labels[top]), weights)
    correct += int((scores.argmax(axis=1) == query_labels[start:start + 256]).sum())
  print(json.dumps({'workdir': args.workdir, 'knn_top1': round(100.0 * correct / len(queries), 2),
                    'k': k, 't': args.t, 'train': len(train), 'eval': len(queries),
                    'classes': len(classes)}))


if __name__ == '__main__':
  main()
