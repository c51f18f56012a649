#!/usr/bin/env bash
# Builds the library and every test with AddressSanitizer + UBSan (the `asan`
# preset: -DGRADLORA_SANITIZE=ON) and runs the whole suite.
#
#   scripts/tests_asan.sh [extra ctest arguments]     JOBS (default 1) parallel builds
#
# LibTorch itself is not instrumented. Leak detection is off: LibTorch keeps
# process-lifetime allocations (operator registry, thread pools) that LeakSanitizer
# reports at exit. UBSan stops at the first finding (halt_on_error=1).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cmake --preset asan
cmake --build --preset asan -j"${JOBS:-1}"
ctest --preset asan "$@"
