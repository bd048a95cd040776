#!/usr/bin/env bash
# Every GPU check in one device command, ~6 minutes on an H100/H200 (a command may run 10):
#   here, where nvcc is:   bash scripts/gpu_prepare.sh      (prebuilds the CUDA kernels into .gpu-cache/)
#   on the GPU machine:    bash scripts/gpu_check.sh OUT    (with .gpu-cache carried: no nvcc needed there)
# Its Python ($PYTHON, default python3) must already have torch >= 2.11 and transformers >= 5.17 (no
# install: such machines may have no network). Without a CUDA device it says so and exits 1 at once;
# else it exits 0 when every step passed, 2 when one did not.
# Each step runs under its own time cap (and all within $GPU_CHECK_BUDGET seconds); a failing or timed-out
# step never stops the next. Under OUT: gpu.txt (nvidia-smi, versions, where the kernels come from, the SDPA
# backend of a masked decode), pytest-gpu.txt/.xml, build-7b.txt, bench-*.txt/.json, and summary.txt (each
# step's status and seconds). The 7B benchmarks share one random-weight llava-next-vicuna-7b engine, built
# in a temp dir while the tests run and deleted at exit.
set -uo pipefail  # no -e: a failed step is recorded and the next one runs
cd "$(dirname "$0")/.."
out=${1:-gpu-results}
py=${PYTHON:-python3}

probe='import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees none")'
if ! why=$("$py" -c "$probe" 2>&1); then
    echo "gpu_check: no CUDA device (${why##*$'\n'})"
    exit 1
fi

mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .gpu-cache ] && export XDG_CACHE_HOME="$PWD/.gpu-cache"  # the kernels gpu_prepare.sh built
engines=$(mktemp -d)
trap 'rm -rf "$engines"' EXIT
budget=${GPU_CHECK_BUDGET:-480}  # seconds for every step together, leaving a 600 s command time to spare

row() { printf '%-20s %-26s %5s\n' "$@" >> "$out/summary.txt"; }
: > "$out/summary.txt"
row step status seconds

# step NAME CAP LOG COMMAND...: COMMAND > OUT/LOG under min(CAP, the budget left), then its summary row
step() {
    local name=$1 cap=$2 log=$3 t0=$SECONDS rc
    shift 3
    (( cap > budget - SECONDS )) && cap=$(( budget - SECONDS ))
    if (( cap < 10 )); then
        row "$name" "skipped (budget spent)" 0
        return
    fi
    timeout --kill-after=10 "$cap" "$@" > "$out/$log" 2>&1
    rc=$?
    if (( rc == 0 )); then
        row "$name" ok $(( SECONDS - t0 ))
    elif (( (rc == 124 || rc == 137) && SECONDS - t0 >= cap )); then
        row "$name" "timed out (cap ${cap} s)" $(( SECONDS - t0 ))
    else
        row "$name" "failed (exit $rc)" $(( SECONDS - t0 ))
    fi
}

facts='import subprocess, torch, transformers
from torch.nn.attention import SDPBackend
from builder.convert.plugins import find_nvcc, prebuilt_plugins
print(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout)
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)
arch = "".join(map(str, torch.cuda.get_device_capability()))
print("kernels: nvcc", find_nvcc(), "| prebuilt sm_" + arch, prebuilt_plugins([arch]), "| prebuilt default archs",
      prebuilt_plugins())
names = {int(v): n for n, v in SDPBackend.__members__.items()}
for heads, kv in ((32, 32), (32, 8)):  # vicuna (MHA), mistral (GQA): a bf16 decode row over 3,072 masked keys
    q = torch.randn(8, heads, 1, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(8, kv, 3072, 128, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(8, 1, 1, 3072, device="cuda", dtype=torch.bool)
    choice = torch._fused_sdp_choice(q, k, k, attn_mask=mask, enable_gqa=heads != kv)
    print(f"sdpa backend, {heads} heads / {kv} KV heads, boolean mask:", names[choice])'
step gpu-facts 60 gpu.txt "$py" -c "$facts"

# the 7B engine: CPU work (random weights, writing and hashing 13.5 GB) that overlaps the GPU tests;
# no CPU kernels (nothing here decodes 7B on a CPU), batch 8 as the benchmarks below
step build-7b 300 build-7b.txt "$py" -m builder build --model llava-next-vicuna-7b --dtype bfloat16 \
    --max-batch-size 8 --plugins on --cpu-kernels off --quiet --output "$engines/7b" &
build=$!
step pytest-gpu 240 pytest-gpu.txt "$py" -m pytest -m gpu -q -p no:cacheprovider --junitxml "$out/pytest-gpu.xml" \
    tests/test_gpu.py tests/test_gpu_kernels.py
wait "$build"

step bench-kernels 60 bench-kernels.txt "$py" scripts/bench_kernels.py --batch 1,8
if [ -f "$engines/7b/manifest.json" ]; then
    step bench-decode-7b 120 bench-decode-7b.txt "$py" scripts/bench_decode.py --device cuda --engine "$engines/7b" \
        --batch 1,8 --ratios 0,0.5
    # pdrop alone: an HF baseline at 7B needs its own checkpoint written and loaded too (~27 GB in fp32)
    step bench-engine-7b 150 bench-engine-7b.txt "$py" scripts/bench_engine.py --engine "$engines/7b" --no-hf \
        --batch 1,8 --ratios 0.5 --max-new-tokens 64 --repeats 2 --json "$out/bench-engine-7b.json"
else
    row bench-decode-7b "skipped (no 7B engine)" 0
    row bench-engine-7b "skipped (no 7B engine)" 0
fi
# against Hugging Face on the small shape, whose checkpoint costs seconds to write
step bench-engine-small 120 bench-engine-small.txt "$py" scripts/bench_engine.py --shape llava-next-small \
    --batch 1,8 --ratios 0.5 --max-new-tokens 64 --repeats 2 --json "$out/bench-engine-small.json"

{
    echo "pytest: $(tail -n 1 "$out/pytest-gpu.txt" 2>/dev/null)"
    echo "total: $SECONDS s; outputs in $out"
} >> "$out/summary.txt"
echo
cat "$out/summary.txt"
! grep -qE '(failed|timed out|skipped) \(' "$out/summary.txt" || exit 2
