"""Prints how much of its bound the official-step equivalence test uses.

Runs tests/test_equivalence.py's float64 comparison with the official MoCo
step (steps 1 and 3) and prints, per step, the largest share of the bound any
element uses and the part of the float64 allowance used (<= 0: none). Run it
under other XLA settings to check that the bound holds there (docs/equivalence.md):

  XLA_FLAGS=--xla_cpu_enable_fast_math=true python tools/equivalence_margin.py
"""

import os
import sys

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, 'tests')]

import test_equivalence  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  with jax.enable_x64(True):
    golden, ours = test_equivalence.run_ours_on_official()
  parts = []
  for step in (1, 3):
    used, growth = test_equivalence._assert_close_to_official(  # pylint: disable=protected-access
        ours[step - 1], golden, step)
    parts.append(f'step {step}: bound used {used:.4f}, float64 allowance used {growth:.3g}')
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}: " + '; '.join(parts))


if __name__ == '__main__':
  main()
