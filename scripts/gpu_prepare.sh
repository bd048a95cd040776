#!/usr/bin/env bash
# Prebuild the CUDA kernels here, where nvcc is, for a GPU machine that may have none:
#   bash scripts/gpu_prepare.sh [ARCH ...]    (default 90: H100/H200) -> .gpu-cache/, git-ignored
#   then on the GPU machine, with .gpu-cache carried:  bash scripts/gpu_check.sh OUT
# The cache is keyed by sources and nvcc flags (builder/convert/plugins.py), so there, without nvcc,
# `build --plugins auto|on`, the kernel tests and bench_kernels.py find these libraries as long as plugins/
# is unchanged. Built: one library per ARCH (what the tests and bench_kernels.py compile for the GPU they
# run on) and one for the default architectures (what `build` compiles without --cuda-archs).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
cache=.gpu-cache
rm -rf "$cache/pdrop/plugins"  # only builds of today's sources travel
XDG_CACHE_HOME="$PWD/$cache" "$py" - "${@:-90}" <<'PY'
import sys

from builder.convert.plugins import DEFAULT_ARCHS, compile_plugins

for archs in [[a] for a in sys.argv[1:]] + [DEFAULT_ARCHS]:
    print(compile_plugins(archs))
PY
echo "carry: $cache ($(du -sh "$cache" | cut -f1); a run's carried paths may total 64 MiB)"
