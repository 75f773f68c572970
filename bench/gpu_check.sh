#!/usr/bin/env bash
# One command on a machine with an NVIDIA GPU (H100-class: about 8 minutes with compilation):
#
#   bash bench/gpu_check.sh [--dry-run] [--skip-build] [--steps LIST] [--out DIR] [--log-dir DIR]
#
#   1 build       pip install --no-deps --no-build-isolation -e . with the CUDA part, for
#                 this GPU's architecture (LARA_CUDA_ARCHS from the device, MAX_JOBS=16);
#                 nothing is fetched from the network
#   2 tests       the GPU tests natively (pytest -m gpu), and the other tests of the
#                 Triton and CUDA files
#   3 sanitizer   compute-sanitizer memcheck and racecheck on a small subset of them
#                 (SANITIZER_TESTS, node ids separated by spaces, replaces the subset)
#   4 cuda-graph  tests/test_cuda_graph.py: lara_attention captured in a CUDA graph and
#                 replayed equals eager, triton and cuda backends
#   5 bench       lara-bench --preset gpu, triton and cuda backends against SDPA's flash
#                 kernel: <out>/gpu-<device>.{md,json,png}, key figures in the summary
#   6 varlen      lara-bench --preset varlen on CUDA (packed batch vs padded + mask vs SDPA;
#                 GQA H=32/H_kv=8 vs repeated k, v): <out>/varlen-<device>.{md,json,png}
#
# Every step logs to <log-dir>/<step>.log (default build/gpu_check); a failing step does
# not stop the others. --steps build,tests,... runs only those (the others show as not
# selected); --skip-build is --steps without build. The summary prints pass/fail per step with its time, the key
# figures of the benchmark (forward at N=8192, forward time at 32k over 4k) and the total.
# Exit status: 0 when every step passed, 1 when one failed, 2 for a usage error.
# The steps share a deadline (GPU_CHECK_BUDGET seconds, default 460): a step gets at most
# what is left, so the whole run stays under 8 minutes even when a step hangs.
# Triton compiles into TRITON_CACHE_DIR (default build/triton-cache), reused by the next run.
#
# --dry-run (or GPU_CHECK_DRY=1) runs what needs no GPU, on CPU: the argument handling,
# the collection of every test the GPU steps would run, the benchmark's table, JSON and
# figure at a tiny size on CPU (into the log directory, not bench/results), and the
# summary. The build is shown, not run (it would replace the compiled module in place).
set -uo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$SELF")/.."          # the repository root; relative --out and --log-dir start here

usage() { sed -n '2,30p' "$SELF" | sed 's/^# \{0,1\}//'; }

ARGS=("$@")
DRY="${GPU_CHECK_DRY:-0}"
SKIP_BUILD=0
ALL_STEPS="build,tests,sanitizer,cuda-graph,bench,varlen"
STEPS="$ALL_STEPS"
RUN_STEP=""    # internal: run one step's function (the script calls itself under `timeout`)
OUT=bench/results
LOG_DIR="${LOG_DIR:-build/gpu_check}"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --skip-build) SKIP_BUILD=1 ;;
    --steps) [ $# -ge 2 ] || { echo "gpu_check.sh: --steps needs a list, e.g. tests,bench" >&2; exit 2; }; STEPS="$2"; shift ;;
    --out) [ $# -ge 2 ] || { echo "gpu_check.sh: --out needs a directory" >&2; exit 2; }; OUT="$2"; shift ;;
    --log-dir) [ $# -ge 2 ] || { echo "gpu_check.sh: --log-dir needs a directory" >&2; exit 2; }; LOG_DIR="$2"; shift ;;
    --run-step) RUN_STEP="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$DRY" in 0|1) ;; *) echo "gpu_check.sh: GPU_CHECK_DRY must be 0 or 1, got '$DRY'" >&2; exit 2 ;; esac
IFS=, read -r -a _wanted <<<"$STEPS"
[ "${#_wanted[@]}" -gt 0 ] || { echo "gpu_check.sh: --steps is empty (steps: $ALL_STEPS)" >&2; exit 2; }
for _s in "${_wanted[@]}"; do
  case ",$ALL_STEPS," in *",$_s,"*) ;; *) echo "gpu_check.sh: unknown step '$_s' in --steps (steps: $ALL_STEPS)" >&2; exit 2 ;; esac
done
selected() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

PY="${PYTHON:-python}"
BUDGET="${GPU_CHECK_BUDGET:-460}"
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_check.sh: GPU_CHECK_BUDGET must be whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac
mkdir -p "$LOG_DIR" || exit 2
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$PWD/build/triton-cache}"
mkdir -p "$TRITON_CACHE_DIR"
START=$(date +%s)
DEADLINE=$((START + BUDGET))

if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1          # as tests/conftest.py does on a machine without a GPU
else
  unset TRITON_INTERPRET             # the GPU runs the kernels natively
  if [ -z "$RUN_STEP" ] && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    echo "gpu_check.sh: no CUDA GPU visible to torch (torch.cuda.is_available() is False);" \
         "run with --dry-run to check the non-GPU parts on this machine" >&2
    exit 2
  fi
fi

NAMES=(); STATUS=(); SECONDS_TAKEN=()
# step NAME LIMIT: run the function step_NAME (in a fresh copy of this script, so that
# `timeout` can stop it and everything it started) with its output in $LOG_DIR/NAME.log,
# under the smaller of LIMIT and what is left of the budget; record pass/FAIL and its time.
step() {
  local name="$1" limit="$2"; shift 2
  if [ -n "$RUN_STEP" ]; then return; fi
  if ! selected "$name"; then skip "$name" "not selected by --steps"; return; fi
  local log="$LOG_DIR/$name.log" now left t0 rc status
  now=$(date +%s); left=$((DEADLINE - now))
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== [$name] (limit ${limit}s, log $log)"
  if [ "$limit" -lt 5 ]; then
    echo "out of time (GPU_CHECK_BUDGET=${BUDGET}s spent)" >"$log"
    NAMES+=("$name"); STATUS+=("FAIL (not run: the time budget was spent)"); SECONDS_TAKEN+=(0)
    return
  fi
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" bash "$SELF" "${ARGS[@]}" --run-step "$name" >"$log" 2>&1
  rc=$?
  if [ "$rc" -eq 0 ]; then status=pass
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="FAIL (timed out after ${limit}s)"
  else status="FAIL (exit $rc)"
  fi
  NAMES+=("$name"); STATUS+=("$status"); SECONDS_TAKEN+=($(( $(date +%s) - t0 )))
  echo "   $status; last lines:"; tail -n 3 "$log" | sed 's/^/   | /'
}
# skip NAME WHY: a step that is shown, not run
skip() {
  if [ -n "$RUN_STEP" ]; then return; fi
  echo "== [$1] skipped: $2" | tee "$LOG_DIR/$1.log"
  NAMES+=("$1"); STATUS+=("skipped ($2)"); SECONDS_TAKEN+=(0)
}

# --------------------------------------------------------------------------- 1. build
step_build() {
  local arch
  arch=$("$PY" -c 'import torch; M, m = torch.cuda.get_device_capability(); print(f"{M}{m}")') || return 1
  echo "building for sm_$arch"
  LARA_CUDA_ARCHS="$arch" MAX_JOBS=16 "$PY" -m pip install --no-deps --no-build-isolation --no-index -v -e . \
    && "$PY" -c 'from lara_kernels import _ops; import lara_kernels.triton_kernels
assert _ops.built_with_cuda(), "lara_kernels._C was built without its CUDA part"
print("lara_kernels._C built with CUDA")'
}
if [ "$SKIP_BUILD" = 1 ]; then
  skip build "--skip-build"
elif [ "$DRY" = 1 ] && selected build; then
  skip build "dry run; would run: LARA_CUDA_ARCHS=<sm of the GPU> MAX_JOBS=16 pip install --no-deps --no-build-isolation --no-index -e ."
else
  step build 240
fi

# --------------------------------------------------------------------------- 2. tests
COLLECT=(); [ "$DRY" = 1 ] && COLLECT=(--collect-only)
step_tests() {
  "$PY" -m pytest -q -p no:cacheprovider "${COLLECT[@]}" tests -m gpu --ignore=tests/test_cuda_graph.py \
    && "$PY" -m pytest -q -p no:cacheprovider "${COLLECT[@]}" tests/test_triton.py tests/test_cuda_ops.py -m "not gpu"
}
step tests 200

# --------------------------------------------------------------------------- 3. sanitizer
# A small subset (seconds natively; compute-sanitizer slows kernels 10-100x): the Triton
# passes on a masked case with N and C not powers of two, the N=1 bfloat16 case, and the
# CUDA passes with large logits and with dy in float32 for half inputs.
read -r -a SAN_TESTS <<<"${SANITIZER_TESTS:-tests/test_triton.py::test_gpu_vs_reference[1-torch.float32] tests/test_triton.py::test_gpu_vs_reference[3-torch.bfloat16] tests/test_cuda_ops.py::test_cuda_passes_large_logits_stay_finite tests/test_cuda_ops.py::test_query_pass_cuda_dy_in_float32}"
SAN="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}"
step_sanitizer() {
  if [ "$DRY" = 1 ]; then
    echo "compute-sanitizer: $SAN ($([ -x "$SAN" ] && echo found || echo 'not found here'))"
    "$PY" -m pytest -q -p no:cacheprovider --collect-only "${SAN_TESTS[@]}"
    return
  fi
  [ -x "$SAN" ] || { echo "compute-sanitizer not found (put it on PATH, or set CUDA_HOME or COMPUTE_SANITIZER)"; return 2; }
  local status=0 tool rc errors
  for tool in memcheck racecheck; do
    echo "-- compute-sanitizer --tool $tool"
    rc=0
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" --error-exitcode 1 --target-processes all \
      "$PY" -m pytest -q -p no:cacheprovider "${SAN_TESTS[@]}" >"$LOG_DIR/sanitizer-$tool.log" 2>&1 || rc=$?
    # "ERROR SUMMARY: n errors" (memcheck), "RACECHECK SUMMARY: ... (n errors, ...)" (racecheck)
    errors=$(grep -E '^=+ .*SUMMARY:' "$LOG_DIR/sanitizer-$tool.log" | grep -Eo '[0-9]+ errors?' \
             | awk '{s += $1} END {print s + 0}')
    tail -n 5 "$LOG_DIR/sanitizer-$tool.log"
    echo "$tool: exit $rc, $errors sanitizer errors (log: $LOG_DIR/sanitizer-$tool.log)"
    { [ "$rc" -eq 0 ] && [ "$errors" -eq 0 ]; } || status=1
  done
  return "$status"
}
step sanitizer 150

# --------------------------------------------------------------------------- 4. CUDA graphs
step_cuda-graph() { "$PY" -m pytest -q -p no:cacheprovider "${COLLECT[@]}" tests/test_cuda_graph.py; }
step cuda-graph 90

# --------------------------------------------------------------------------- 5. benchmark
step_bench() {
  local out args tag
  if [ "$DRY" = 1 ]; then
    out="$LOG_DIR/bench"
    args=(--device cpu --lengths 16 32 --backends cpu --threads 1 --min-run-time 0.01
          --key-n 32 --ratio 32/16 --stem gpu-dry-run-cpu)
  else
    out="$OUT"
    tag=$("$PY" -c 'import torch; from lara_kernels.bench import sanitize; print(sanitize(torch.cuda.get_device_name()))') \
      || return 1
    args=(--device cuda --backends triton,cuda --sdpa flash --key-n 8192 --ratio 32768/4096 --stem "gpu-$tag")
  fi
  "$PY" -m lara_kernels.bench --preset gpu --no-progress --out "$out" "${args[@]}"
}
step bench 240

# --------------------------------------------------------------------------- 6. varlen and GQA benchmark
step_varlen() {
  local out args tag
  if [ "$DRY" = 1 ]; then
    out="$LOG_DIR/varlen"
    args=(--device cpu --backends cpu --lengths 40 64 17 --gqa-lengths 64 --threads 1 --min-run-time 0.01
          --stem varlen-dry-run-cpu)
  else
    out="$OUT"
    tag=$("$PY" -c 'import torch; from lara_kernels.bench import sanitize; print(sanitize(torch.cuda.get_device_name()))') \
      || return 1
    args=(--device cuda --backends triton,cuda --gqa-lengths 2048 8192 --stem "varlen-$tag")
  fi
  "$PY" -m lara_kernels.bench --preset varlen --no-progress --out "$out" "${args[@]}"
}
step varlen 90

if [ -n "$RUN_STEP" ]; then
  declare -F "step_$RUN_STEP" >/dev/null || { echo "gpu_check.sh: no step '$RUN_STEP'" >&2; exit 2; }
  "step_$RUN_STEP"
  exit $?
fi

# --------------------------------------------------------------------------- summary
END=$(date +%s)
echo
echo "== gpu_check summary ($([ "$DRY" = 1 ] && echo 'dry run on CPU' || "$PY" -c 'import torch; print(torch.cuda.get_device_name())' 2>&1); logs in $LOG_DIR)"
failed=0
for i in "${!NAMES[@]}"; do
  printf '  %-11s %-6ss  %s\n' "${NAMES[$i]}" "${SECONDS_TAKEN[$i]}" "${STATUS[$i]}"
  case "${STATUS[$i]}" in FAIL*) failed=1 ;; esac
done
grep -h -E '^(Key figure|Gate |Skipped )' "$LOG_DIR/bench.log" "$LOG_DIR/varlen.log" 2>/dev/null | sed 's/^/  /'
grep -h -E '^wrote ' "$LOG_DIR/bench.log" "$LOG_DIR/varlen.log" 2>/dev/null | sed 's/^/  bench: /'
echo "  elapsed: $((END - START)) s (budget ${BUDGET} s)"
if [ "$failed" = 0 ]; then echo "gpu_check: all steps passed or skipped"; else echo "gpu_check: FAILED (see the logs)"; fi
exit "$failed"
