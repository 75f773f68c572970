#!/usr/bin/env bash
# Builds csrc/ with CMake against the installed torch and runs its ctest; compiles every
# .cu file with nvcc for sm_80 and sm_90 when nvcc is found (no GPU needed), and
# syntax-checks the torch bindings of the CUDA kernels. Fails if anything fails.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD="${BUILD_DIR:-build/cmake}"
PREFIX="$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')"
cmake -S . -B "$BUILD" -DCMAKE_PREFIX_PATH="$PREFIX" -DLARA_CUDA_ARCHS="80;90"
cmake --build "$BUILD" -j "$(nproc)"
ctest --test-dir "$BUILD" --output-on-failure

if command -v nvcc >/dev/null 2>&1; then
  echo "== nvcc -c for sm_80 and sm_90"
  for f in csrc/cuda/*.cu; do
    nvcc -std=c++17 -c "$f" -o /dev/null -Icsrc \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
    echo "compiled $f"
  done
  # The bindings include torch's CUDA headers. A CPU build of torch ships them without
  # its generated cuda_cmake_macros.h; an empty stand-in lets g++ check their syntax.
  STUB="$(mktemp -d)"
  mkdir -p "$STUB/c10/cuda/impl" && echo '#pragma once' > "$STUB/c10/cuda/impl/cuda_cmake_macros.h"
  INC="$(python -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I' + p for p in include_paths()))")"
  CUDA_HOME="${CUDA_HOME:-$(python -c 'from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or "/usr/local/cuda")')}"
  CUDA_INC="$CUDA_HOME/include"
  for f in csrc/lara_ops.cpp csrc/cuda/*.cpp; do
    [ -e "$f" ] || continue
    g++ -std=c++17 -fsyntax-only -w -DLARA_WITH_CUDA $INC -I"$STUB" -I"$CUDA_INC" -Icsrc "$f"
    echo "checked $f (with LARA_WITH_CUDA)"
  done
  rm -rf "$STUB"
else
  echo "nvcc not found: CUDA sources not compiled"
fi
