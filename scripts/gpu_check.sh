#!/usr/bin/env bash
# Every GPU check in one command, on a machine with a CUDA device whose Python already has
# torch >= 2.11 and transformers >= 5.17 (no install: such machines may have no network).
#   bash scripts/gpu_check.sh [outdir]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-results}}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
"$py" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' | tee -a "$out/gpu.txt"
"$py" -m pytest -q -m gpu tests/test_gpu.py tests/test_gpu_kernels.py 2>&1 | tee "$out/pytest-gpu.txt"
"$py" scripts/bench_kernels.py --batch 1,8 2>&1 | tee "$out/bench-kernels.txt"
for preset in llava-next-small llava-next-vicuna-7b; do
    "$py" scripts/bench_engine.py --preset "$preset" --device cuda --ratios 0,0.25,0.5,0.75 \
        --repeats 5 --max-new-tokens 64 --json "$out/bench-$preset.json" 2>&1 | grep -v converting \
        | tee "$out/bench-$preset.txt"
done
