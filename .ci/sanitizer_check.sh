#!/usr/bin/env bash
# Runs the GPU tests (pytest -m gpu) under compute-sanitizer memcheck, then racecheck (by
# hand on a machine with an NVIDIA GPU, not in CI): out-of-bounds or misaligned accesses
# and shared-memory races in the Triton and CUDA kernels fail it. Logs in $LOG_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
SAN="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}"
[ -x "$SAN" ] || { echo "compute-sanitizer not found (put it on PATH, or set CUDA_HOME or COMPUTE_SANITIZER)" >&2; exit 2; }
python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' \
  || { echo "no CUDA GPU visible to torch: the GPU tests would only skip themselves" >&2; exit 2; }
LOG_DIR="${LOG_DIR:-build/sanitizer}"
mkdir -p "$LOG_DIR"
export PYTORCH_NO_CUDA_MEMORY_CACHING=1   # one cudaMalloc per tensor: memcheck sees each tensor's bounds
unset TRITON_INTERPRET
status=0
summary=()
for tool in memcheck racecheck; do
  echo "== compute-sanitizer --tool $tool: pytest -m gpu"
  rc=0
  "$SAN" --tool "$tool" --error-exitcode 1 --target-processes all \
    python -m pytest -q tests -m gpu -p no:cacheprovider 2>&1 | tee "$LOG_DIR/$tool.log" || rc=$?
  # "ERROR SUMMARY: n errors" (memcheck), "RACECHECK SUMMARY: ... (n errors, ...)" (racecheck)
  errors=$(grep -E '^=+ .*SUMMARY:' "$LOG_DIR/$tool.log" | grep -Eo '[0-9]+ errors?' | awk '{s += $1} END {print s + 0}')
  summary+=("$tool: exit $rc, $errors sanitizer errors (log: $LOG_DIR/$tool.log)")
  [ "$rc" -eq 0 ] && [ "$errors" -eq 0 ] || status=1
done
echo "== summary"
printf '%s\n' "${summary[@]}"
[ "$status" -eq 0 ] && echo "compute-sanitizer: no errors" || echo "compute-sanitizer: FAILED (see above and the logs)"
exit "$status"
