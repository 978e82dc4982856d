"""MoCo v3 step cost of the paper's ResNet-50 and ViT-S/16 recipes: time, FLOPs, compiled memory.

  nice -n 10 python benchmarks/bench_mocov3.py --batches=8,16 --steps=2

For each recipe (configs/mocov3_r50.py, configs/mocov3_vit_small.py at 224 px,
float32) and each batch, it builds the real sharded train step
(`step.make_sharded_step`: augmentation, both views through the encoder and
the momentum encoder, the symmetric loss, LARS / AdamW, the momentum update)
on one device and reports:
  * XLA's compile-time memory analysis (arguments, outputs, temporaries):
    the memory the step needs on a device, without running it; from two
    batches the per-image slope, which projects the per-device memory of
    larger batches (a linear estimate, labelled so);
  * XLA's FLOPs of one step per image (cost analysis);
  * the measured time of `--steps` steps after the compiling one: on a CPU
    these are CPU figures, not an accelerator's.
"""

import argparse
import json
import os
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import bench_train  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import mocov3_r50  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import mocov3_vit_small  # pylint: disable=g-import-not-at-top,wrong-import-position

RECIPES = {'r50_224': mocov3_r50.get_config, 'vit_s16_224': mocov3_vit_small.get_config}


def measure(name: str, batch: int, steps: int) -> dict:
  config = RECIPES[name]()
  config.batch_size = batch
  config.data.source = 'synthetic'
  bench = bench_train.StepBench(config, devices=jax.devices()[:1], total_steps=1 + steps)
  compile_and_first = bench.first_step()
  inputs = bench._inputs()  # pylint: disable=protected-access
  memory = bench.p_step.lower(bench.state, *inputs).compile().memory_analysis()
  elapsed = bench.run(steps) if steps else float('nan')
  loss = bench.finish()
  return dict(
      recipe=name, model=config.model.name, batch=batch, device=jax.devices()[0].device_kind,
      first_step_s=round(compile_and_first, 1), step_s=round(elapsed / max(steps, 1), 2),
      images_per_s=round(batch * steps / elapsed, 2) if steps else None,
      gflop_per_image=round(bench.flops_per_image / 1e9, 2),
      argument_mib=round(memory.argument_size_in_bytes / 2**20, 1),
      output_mib=round(memory.output_size_in_bytes / 2**20, 1),
      temp_mib=round(memory.temp_size_in_bytes / 2**20, 1), loss=round(loss, 4))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--recipes', default='r50_224,vit_s16_224')
  parser.add_argument('--batches', default='8,16')
  parser.add_argument('--steps', type=int, default=2)
  args = parser.parse_args()
  rows = []
  for name in args.recipes.split(','):
    for batch in (int(b) for b in args.batches.split(',')):
      start = time.time()
      row = measure(name, batch, args.steps)
      row['wall_s'] = round(time.time() - start, 1)
      print(json.dumps(row), flush=True)
      rows.append(row)
  for name in args.recipes.split(','):
    mine = [r for r in rows if r['recipe'] == name]
    if len(mine) >= 2:
      a, b = mine[0], mine[-1]
      slope = (b['temp_mib'] - a['temp_mib']) / (b['batch'] - a['batch'])
      fixed = a['argument_mib'] + a['temp_mib'] - slope * a['batch']
      print(json.dumps(dict(recipe=name, temp_mib_per_image=round(slope, 2),
                            projected_gib_at_512_per_device=round((fixed + 512 * slope) / 1024, 1))))


if __name__ == '__main__':
  main()
