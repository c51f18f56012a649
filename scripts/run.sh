#!/usr/bin/env bash
# The main job: installs what is missing, builds the `gradlora` trainer and
# runs the default experiment (configs/experiment.yaml): pre-train a small
# byte-level Transformer on corpus A until its validation loss stops improving,
# choose every method's learning rate on the validation split of corpus B,
# fine-tune with every method on 3 seeds, and print learning vs forgetting
# (mean ± std over seeds) and the forgetting at matched learning.
# Outputs in out/experiment (results.md, sweep.md, frontier.md, *.svg), then
# the report of scripts/experiment_report.py (out/experiment/report.md).
# Extra arguments go to `gradlora compare` (e.g. --quick, --config, --out).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
BUILD_DIR="${BUILD_DIR:-build}"
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build "$BUILD_DIR" -j"$(nproc)" --target gradlora_cli
CONFIG=configs/experiment.yaml OUT=""
rest=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config | -c) CONFIG="$2"; shift 2 ;;
    --out | -o) OUT="$2"; shift 2 ;;
    --quick) QUICK=1; rest+=("$1"); shift ;;
    *) rest+=("$1"); shift ;;
  esac
done
if [ -z "$OUT" ]; then
  OUT="out/$(basename "$CONFIG" .yaml)"
  if [ "${QUICK:-0}" = 1 ]; then OUT="$OUT-quick"; fi
fi
# One run per core at a time (each run uses one thread: on these small
# matrices a second thread costs more than it gains).
"$BUILD_DIR/app/gradlora" compare --config "$CONFIG" --out "$OUT" --jobs "$(nproc)" "${rest[@]}"
if command -v python3 > /dev/null; then
  python3 scripts/experiment_report.py "$OUT"
fi
