#!/usr/bin/env bash
# Wheels of the GPU comparison anchors (bitsandbytes, torchao, FlashOptim) for a GPU machine that cannot
# download: saved under .whl/ (git-ignored, ~47 MB, under the device tool's 64 MiB carry limit);
# bench/gpu_check.sh installs them from there. Run here, then carry ".whl" with the GPU call.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${GPU_PYTHON_VERSION:-3.12}"   # the GPU image's python
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl bitsandbytes==0.50.2 torchao==0.18.0 flashoptim==0.1.4
ls -la .whl
