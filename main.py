"""MoCo v2 pretraining and evaluation.

  python main.py --config=configs/imagenette.py --workdir=DIR [--config.a.b=value]
  python main.py --mode=knn|linear_eval|export|report|embed --workdir=DIR [--config.a.b=value]

Without --config, the run's own DIR/config.json (written when pretraining
starts) is the config, and --config.a.b=value overrides apply on top of it
(`moco_jax/run/run_config.py`): evaluations see the model and data of the
pretraining run, and `python main.py --workdir=DIR` alone resumes a run.
A new run (no DIR/config.json yet) needs --config.

--mode=train pretrains (with the kNN monitor); knn and linear_eval evaluate the
latest checkpoint of DIR (or, with --config.eval.random_init=True, the step-0
encoder: the floor) and merge their results into DIR/eval.json; export writes
DIR/backbone_torchvision.npz (or .pkl, .safetensors: export.format); report writes
DIR/report/index.html for the latest checkpoint; embed writes the backbone's
features of every image of a split to DIR/embeddings/<split>.npy with an index;
pack writes the train and eval splits of --config.data.path (or tfds) as
ArrayRecord shards + manifest.json into DIR, which --config.data.path=DIR then reads.

This file is intentionally kept short, as flax's examples: it maps each mode to
the function that does the work (which tests call too). Flags, the config's
source, `config_checks.validate` (every mode, before any work), many-process
start-up and the one-line errors are `moco_jax/cli.py`'s.

Ctrl-C or SIGTERM stops training at the next step, saves it and exits with
130 (Ctrl-C) or 75 (SIGTERM, EX_TEMPFAIL: rerun until it succeeds); an
evaluation stops at once with the same codes; a second Ctrl-C aborts at once
(`moco_jax/run/stopping.py`).
"""

from absl import app
from absl import logging

from moco_jax import cli
from moco_jax.data import pack
from moco_jax.evaluation import embed
from moco_jax.evaluation import export
from moco_jax.evaluation import knn
from moco_jax.evaluation import linear_probe
from moco_jax.evaluation import report
from moco_jax import pretrain

MODES = {
    'train': pretrain.train_and_evaluate,
    'knn': lambda config, workdir: logging.info('Results: %s', knn.run_knn(config, workdir)),
    'linear_eval': lambda config, workdir: logging.info(
        'Results: %s', linear_probe.run_linear_eval(config, workdir)),
    'export': lambda config, workdir: logging.info(
        'Wrote %s.', export.run_export(config, workdir)),
    'report': lambda config, workdir: logging.info(
        'Wrote %s.', report.run_report(config, workdir)),
    'pack': pack.run_pack,
    'embed': lambda config, workdir: logging.info('Wrote %s.', embed.run_embed(config, workdir)),
}


def main(argv):
  cli.run(argv, MODES)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
