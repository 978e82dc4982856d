#!/usr/bin/env bash
# Every GPU figure of issue 23 in one command (see benchmarks/gpu_check.py and
# docs/benchmarks.md "GPU check" for the exact device call).
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine, <= 9 minutes, into $OUT
#   bash benchmarks/gpu_check.sh --rehearse   # the same on a CPU with tiny sizes
#   GPUCHECK_PEER_GITDIR=DIR bash benchmarks/gpu_check.sh --prepare   # here, once: what travels
#
# --prepare fills the git-ignored folders that must travel with the device call: .whl/
# (ml-collections, which the GPU image lacks, and the pinned flax, optax and orbax-checkpoint,
# so that the GPU runs the versions the rehearsal proved; all pure Python; plus grain and
# array-record for the packed-shards stage, CPython 3.12 binaries), .data/ (the 128 px
# Imagenette archive from ../shared/data) and .peer/moco (the official code at 7397dfe, exported from DIR, the git directory that the
# search tool's `fetch github:facebookresearch/moco` returned), then measures their size.
#
# A run installs the carried wheels (.whl/) into a private folder first, exactly as the device command must, then runs the driver and
# keeps its progress in $OUT/log.txt. GPUCHECK_PYTHON picks the interpreter (default python3).
set -u

# One function, called on the last line: bash parses it whole before running it, so an edit
# of this file during a run cannot derail the run.
main() {
  START=$(date +%s)
  cd "$(dirname "$0")/.." || exit 2
  PY=${GPUCHECK_PYTHON:-python3}
  if [ "${1:-}" = --prepare ]; then
    mkdir -p .whl .data .peer/moco || exit 2
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux2014_x86_64 -d .whl ml-collections==1.1.0 \
      flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8 \
      || { echo "Error (wheels): pip download into .whl failed" >&2; exit 3; }
    # Packed shards (issue 29): grain and array-record (binary, CPython 3.12) and what grain
    # imports that the GPU image may lack.
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
      -d .whl grain==0.2.18 array-record==0.8.6 cloudpickle==3.1.3 etils==1.15.0 \
      portpicker==1.6.0 psutil==7.2.2 \
      || { echo "Error (wheels): pip download of grain/array-record into .whl failed" >&2; exit 3; }
    [ -f .data/imagenette2-128sq.tgz ] || cp "${GPUCHECK_ARCHIVE:-../shared/data/imagenette2-128sq.tgz}" .data/ \
      || { echo "Error (data): set GPUCHECK_ARCHIVE to imagenette2-128sq.tgz" >&2; exit 3; }
    if [ ! -f .peer/moco/moco/builder.py ]; then
      [ -n "${GPUCHECK_PEER_GITDIR:-}" ] || { echo "Error (peer): set GPUCHECK_PEER_GITDIR to the git directory of a fetched facebookresearch/moco" >&2; exit 3; }
      git --git-dir="$GPUCHECK_PEER_GITDIR" archive 7397dfe main_moco.py moco LICENSE | tar -x -C .peer/moco \
        || { echo "Error (peer): git archive 7397dfe failed in $GPUCHECK_PEER_GITDIR" >&2; exit 3; }
    fi
    exec "$PY" benchmarks/gpu_check.py --size_check
  fi
  OUT=${OUT:-$PWD/.gpucheck}
  export OUT
  mkdir -p "$OUT" || exit 2
  if compgen -G '.whl/*.whl' >/dev/null; then
    SITE=$(mktemp -d /tmp/gpucheck_site.XXXXXX)
    # Binary wheels are for the GPU image's CPython 3.12; another interpreter (a rehearsal in
    # this venv) keeps its own grain and array-record.
    PYTAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    WHEELS=$(ls .whl/*.whl | grep -v -- '-cp3[0-9]*-' ; ls .whl/*-"$PYTAG"-*.whl 2>/dev/null)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" $WHEELS || { echo "Error (wheels): pip could not install .whl/*.whl" >&2; exit 3; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONUNBUFFERED=1
  "$PY" benchmarks/gpu_check.py --started_at="$START" --out="$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
  exit "${PIPESTATUS[0]}"
}

main "$@"
