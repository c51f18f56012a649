#!/usr/bin/env bash
# The main job: installs what is missing, builds the `gradlora` trainer and
# runs the default experiment (configs/experiment.yaml): pre-train a small
# character-level Transformer on corpus A, fine-tune it on corpus B with every
# method, and print learning vs forgetting (mean ± std over seeds).
# Extra arguments go to `gradlora compare` (e.g. --quick).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
BUILD_DIR="${BUILD_DIR:-build}"
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build "$BUILD_DIR" -j"$(nproc)" --target gradlora_cli
exec "$BUILD_DIR/app/gradlora" compare --config configs/experiment.yaml --out out/experiment "$@"
