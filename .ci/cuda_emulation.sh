#!/usr/bin/env bash
# Runs the CUDA kernels (csrc/cuda/*.cu: passes, segment means and the whole op's kernels, with
# their bindings) on the
# CPU, without a GPU, through tests/test_cuda_ops.py. CI runs the smoke subset (.ci/run);
# --all by hand. Fails if any case fails.
#
# How: .ci/cuda_emulation/gen.py copies the CUDA sources into build/cuda_emulation/gen, only
# rewriting the launch syntax <<<...>>>; they are compiled as host C++ against emu.h, where
# each block runs as 256 OS threads, __syncthreads() and the warp shuffles are barriers, and
# dynamic shared memory is filled with NaN before each block (a write past the requested size
# aborts), and every launch is checked against a device's grid limits (x <= the reported
# cudaDevAttrMaxGridDimX, y and z <= 65535). The tests then call these emulated ops in place
# of the CUDA ones; a few cases of the emulation itself lower the emulated device's grid x
# limit or shared memory, or check the launches of B x H = 65536 without running them
# (.ci/cuda_emulation/run_tests.py).
#
# What it proves: the kernels' indexing (strides, padding, tails, splits of the long axes),
# their synchronization as written (a missing __syncthreads or a read of unwritten shared
# memory shows up as NaN or a wrong result), the launchers' shape/dtype logic, the launch
# geometry and the math, against the float64 oracle and the CPU ops, for float32/float64/float16/bfloat16;
# in the packed (varlen) layout, against the same emulated ops in the padded layout on each sequence
# and the float64 eager passes (empty sequences, sequences without keys, key passes of 256 and 512
# rows), with every output of the emulated ops NaN-filled before the kernels run (test mode); the
# whole op (lara_fwd / lara_bwd) against the CPU ops, its launch count per configuration, and
# that it calls nothing of ATen but allocations (no compute op, no host synchronization).
# What it does not: real GPU behaviour: warp scheduling and independent thread scheduling
# within a warp, the GPU memory model and races the barrier emulation hides, performance,
# register/shared-memory limits of a real device, and fast-math intrinsics (the emulation
# uses exact libm; nvcc's --use_fast_math exp/log/division differ by a few ulp).
#
# Usage: .ci/cuda_emulation.sh            smoke subset (37 cases, ~9-12 minutes on 2 cores, plus the build)
#        .ci/cuda_emulation.sh --all      every case (~15-20 minutes on 2 cores, plus the build)
#        .ci/cuda_emulation.sh FILTER     cases whose name contains FILTER (e.g. key_pass, float64)
#        .ci/cuda_emulation.sh --list     the case names (the smoke ones marked)
# Needs: the CPU build of lara_kernels._C (the CPU ops are compared too), a C++20 compiler,
# ninja, and the CUDA toolkit headers (cuda_runtime.h; CUDA_HOME, else /usr/local/cuda).
# The build goes to build/cuda_emulation (CUDA_EMU_BUILD_DIR overrides, relative to the repo).
set -euo pipefail
cd "$(dirname "$0")/.."
export MAX_JOBS="${MAX_JOBS:-2}"
echo "== CUDA kernels under the CPU emulation (${1:-smoke subset})"
if python .ci/cuda_emulation/run_tests.py "$@"; then
  echo "cuda_emulation: OK"
else
  rc=$?
  echo "cuda_emulation: FAILED (exit $rc)" >&2
  exit "$rc"
fi
