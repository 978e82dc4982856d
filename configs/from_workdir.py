"""The config a run was made with: WORKDIR/config.json (see moco_jax/run/run_config.py).

  python main.py --mode=knn --config=configs/from_workdir.py:DIR --workdir=DIR

`main.py` uses this by itself when --config is left out and DIR/config.json
exists; --config.a.b=v overrides apply on top, as with any config file.
"""

from configs import default
from moco_jax.run import run_config


def get_config(workdir: str):
  # Fields added to the code after the run was made take their defaults.
  return run_config.load_run_config(workdir, defaults=default.get_config())
