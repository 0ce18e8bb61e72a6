#!/usr/bin/env bash
# Every GPU check in one command, for a CUDA machine that has torch, h5py, numpy, scipy, tqdm and
# pytest but no network: the gpu-marked tests (the GPU path against the CPU), then the GPU benchmark.
# Logs and results go to $OUT (default gpu-out/). Extra arguments go to benchmarks/gpu.py.
#
#   benchmarks/gpu_session.sh                           # on the GPU machine, from the repository root
#   LANDSCAPE_GPU_TESTS_DEVICE=cpu benchmarks/gpu_session.sh --smoke --device cpu   # checks this script
#
# The benchmark's MNIST-1D is read from $LANDSCAPE_CACHE/mnist1d-default.npz when the mnist1d package
# is missing there: copy ~/.cache/landscape/mnist1d-default.npz into a folder that travels with the
# tree (.gpu-carry/, ignored by git) and run with LANDSCAPE_CACHE=.gpu-carry.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  git rev-parse --short HEAD 2>/dev/null; } | tee "$out/machine.txt"

timeout 240 "$py" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py tests/test_evaluate.py 2>&1 \
    | tee "$out/gpu-tests.log"
tests=${PIPESTATUS[0]}
timeout 330 "$py" benchmarks/gpu.py --json "$out/gpu-results.json" "$@" 2>&1 | tee "$out/gpu-benchmark.log"
bench=${PIPESTATUS[0]}
echo "gpu tests: exit $tests; benchmark: exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
