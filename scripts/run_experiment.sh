#!/usr/bin/env bash
# Builds the gradlora trainer and runs the default experiment (docs/experiment.md):
# continual fine-tuning of a small byte-level Transformer, one run per method and seed.
#
#   scripts/run_experiment.sh            # the full run (about 15 minutes on 2 cores)
#   scripts/run_experiment.sh --quick    # a short version (under 2 minutes)
#
# Extra arguments go to `gradlora compare` (e.g. --set training.steps=100, --fresh).
# Results: out/experiment[-quick]/results.md, results.csv, compare.svg.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
scripts/setup.sh
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build "$BUILD" -j2 --target gradlora_cli
exec "./$BUILD/app/gradlora" compare --config configs/experiment.yaml "$@"
