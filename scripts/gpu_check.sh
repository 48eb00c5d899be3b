#!/usr/bin/env bash
# The one call a session lent a GPU makes (well under 5 minutes), the most
# important checks first:
#   1. the GPU test suite on real CuPy arrays: every public call, every flag,
#      float16/32/64, NCHW and channels-last, results against the float64
#      reference (the PTX budget is checked in CI, without a GPU);
#   2. python -m numba_bn.bench --device cuda: 256 MiB tensors against
#      PyTorch's CUDA batch norm and the device copy roofline, with the
#      device's name.
# It installs nothing and runs from the working tree. Logs go to $OUT (the
# device tool's folder) or /tmp. Under NUMBA_ENABLE_CUDASIM=1 (CI) the same
# steps run on the simulator with tiny shapes.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
logs="${OUT:-/tmp}"
status=0
python -m pytest -q -p no:cacheprovider tests/gpu --ignore=tests/gpu/test_ptx.py \
    2>&1 | tee "$logs/gpu_tests.log" || status=1
python -m numba_bn.bench --device cuda 2>&1 | tee "$logs/gpu_bench.log" || status=1
exit "$status"
