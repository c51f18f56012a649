#!/usr/bin/env bash
# Runs clang-tidy with the repository's curated .clang-tidy over the library, the data-parallel
# target and the trainer (installs clang-tidy when missing). Slow: about 25 s per file on 2
# cores, so it is not part of CI; run it before a release. Exit 1 on any finding.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if ! command -v clang-tidy >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq clang-tidy >/dev/null
fi
# Precompiled headers are GCC's: clang-tidy needs a compile database without them.
cmake -S . -B build-tidy -DCMAKE_EXPORT_COMPILE_COMMANDS=ON -DCMAKE_DISABLE_PRECOMPILE_HEADERS=ON \
  -DGRADLORA_BUILD_TESTS=OFF -DGRADLORA_BUILD_BENCH=OFF -DGRADLORA_BUILD_EXAMPLES=OFF >/dev/null
mapfile -t files < <(git ls-files 'src/*.cpp' 'src/methods/*.cpp' 'app/*.cpp')
printf '%s\n' "${files[@]}" | xargs -P "$(nproc)" -n 1 clang-tidy -p build-tidy --quiet --extra-arg=-std=c++17
echo "tidy: ${#files[@]} files, no findings"
