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
"$py" scripts/bench_decode.py --device cuda --shape llava-next-vicuna-7b --batch 1,8,32 2>&1 \
    | tee "$out/bench-decode-7b.txt"
"$py" scripts/bench_engine.py --shape llava-next-small --batch 1,8 --max-new-tokens 128 \
    --json "$out/bench-engine-small.json" 2>&1 | tee "$out/bench-engine-small.txt"
"$py" scripts/bench_engine.py --shape llava-next-vicuna-7b --batch 1,8 --max-new-tokens 128 \
    --json "$out/bench-engine-7b.json" 2>&1 | tee "$out/bench-engine-7b.txt"
