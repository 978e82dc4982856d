#!/bin/bash
# Each method trains with `python main.py` (configs/tiny.py, synthetic data, 8 simulated CPU
# devices, 8 steps), then goes through every evaluation mode with `python main.py --mode=...`;
# one line per command: exit code, tracebacks in its output, seconds, the result it logged.
#
#   bash tools/every_mode.sh [OUT_DIR] [METHOD ...]     (default: /tmp/every_mode, all three)
#
# A smoke check of the user's path (the tests run the same modes in-process, with checks on
# what each result was computed from: tests/test_mechanisms_eval.py).
set -u
cd "$(dirname "$0")/.."
export XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu
PY=${PYTHON:-python}
OUT=${1:-/tmp/every_mode}; shift || true
METHODS=${*:-end_to_end memory_bank moco}
rm -rf "$OUT"; mkdir -p "$OUT"
for m in $METHODS; do
  W=$OUT/$m
  t0=$(date +%s)
  $PY main.py --config=configs/tiny.py --workdir="$W" --config.method="$m" \
    --config.num_train_steps=8 --config.checkpoint_every_steps=4 \
    --config.memory_bank.num_negatives=100 > "$OUT/$m.train.log" 2>&1
  rc=$?
  echo "$m train: rc=$rc tracebacks=$(grep -c Traceback "$OUT/$m.train.log") $(( $(date +%s) - t0 )) s:" \
       "$(grep -o 'step 8 .*' "$OUT/$m.train.log" | tail -1 | cut -c1-60)"
  for mode in "knn" "linear_eval" \
              "linear_eval --config.eval.linear_protocol=paper --config.eval.linear_epochs=2" \
              "export" "export --config.export.format=detectron2" "report"; do
    log="$OUT/$m.${mode%% *}.log"
    t0=$(date +%s)
    # shellcheck disable=SC2086  # $mode holds the mode and its overrides.
    $PY main.py --workdir="$W" --mode=$mode > "$log" 2>&1
    rc=$?
    echo "$m --mode=$mode: rc=$rc tracebacks=$(grep -c Traceback "$log") $(( $(date +%s) - t0 )) s:" \
         "$(grep -o 'Results: .*\|Wrote /.*' "$log" | tail -1 | cut -c1-140)"
  done
done
