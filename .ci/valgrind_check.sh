#!/usr/bin/env bash
# Runs the C++ ops' ctest binaries under valgrind memcheck (by hand, not in every CI run):
# invalid reads/writes or uses of uninitialized memory in csrc/cpu fail it.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD="${BUILD_DIR:-build/cmake}"
[ -x "$BUILD/test_landmarks" ] && [ -x "$BUILD/test_passes" ] || bash .ci/check_build.sh
for t in test_landmarks test_passes; do
  valgrind --error-exitcode=9 --leak-check=no "$BUILD/$t"
done
