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
  echo "== nvcc -c for sm_80 and sm_90 (setup.py's flags), with each kernel's resource usage"
  RES="$(mktemp -d)"
  for f in csrc/cuda/*.cu; do
    nvcc -std=c++17 -O3 --use_fast_math -c "$f" -o /dev/null -Icsrc --resource-usage \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 2> "$RES/$(basename "$f").txt" \
      || { cat "$RES/$(basename "$f").txt" >&2; exit 1; }
    echo "compiled $f"
  done
  # registers, stack and spills per kernel instantiation and arch (ptxas; the same figures as
  # cuobjdump -res-usage). Shared memory is dynamic, sized by the launchers: not shown here.
  python3 - "$RES"/*.txt <<'PY'
import re, sys
rows, cur = [], None
for path in sys.argv[1:]:
    for line in open(path):
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if m:
            cur = [m.group(1), m.group(2), 0, 0, 0, 0]
            rows.append(cur)
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            cur[3:6] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m and cur:
            cur[2] = int(m.group(1))
spills = [r for r in rows if r[4] or r[5]]
print(f"{len(rows)} kernel instantiations; registers <= {max(r[2] for r in rows)}; "
      f"{len(spills)} with spills (bytes stored/loaded: {sum(r[4] for r in spills)}/{sum(r[5] for r in spills)})")
PY
  rm -rf "$RES"
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
