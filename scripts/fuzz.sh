#!/usr/bin/env bash
# Fuzzes the YAML config loader with libFuzzer for a bounded time.
#
#   scripts/fuzz.sh [SECONDS]        default 60; BUILD_DIR (default build-fuzz)
#
# Needs clang and libclang-rt-14-dev (installed here when missing). Seeds: the
# committed corpus (tests/fuzz/corpus) and the malformed configs of the tests
# (tests/data/bad_configs); new inputs go to $BUILD_DIR/fuzz-corpus, crashes to
# $BUILD_DIR/fuzz-artifacts/. Exit status: 0 when nothing was found.
set -euo pipefail
secs=${1:-60}
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$root/build-fuzz}

if ! dpkg-query -W -f='${Status}' libclang-rt-14-dev 2>/dev/null | grep -q 'install ok installed' \
   || ! command -v clang++ >/dev/null; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends clang libclang-rt-14-dev
fi

cmake -S "$root" -B "$build" -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DGRADLORA_FUZZ=ON -DGRADLORA_BUILD_TESTS=ON -DGRADLORA_BUILD_EXAMPLES=OFF -DGRADLORA_BUILD_BENCH=OFF \
  -DGRADLORA_BUILD_APP=OFF >/dev/null
cmake --build "$build" --target gradlora_fuzz_yaml -j"${JOBS:-1}"

corpus="$build/fuzz-corpus"
artifacts="$build/fuzz-artifacts"
mkdir -p "$corpus" "$artifacts"
cp -n "$root"/tests/fuzz/corpus/* "$root"/tests/data/bad_configs/*.yaml "$corpus"/ 2>/dev/null || true

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
"$build/tests/fuzz/gradlora_fuzz_yaml" "$corpus" \
  -dict="$root/tests/fuzz/yaml.dict" \
  -max_total_time="$secs" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
  -artifact_prefix="$artifacts/" -print_final_stats=1
