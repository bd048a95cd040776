#!/usr/bin/env bash
# Build the tiny demo engine and ask it about the bundled picture (its weights are random: the
# answer is noise; the point is the machinery, the keep map and the timings).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/python -m builder build --model demo --drop-ratio 0.5 --output engines/demo --force
.venv/bin/python -m builder run --engine engines/demo --image docs/example.png --chat \
    --prompt "What shapes are in the picture?" --max-new-tokens 24 --keep-map engines/demo-keep-map.png
echo "keep map: engines/demo-keep-map.png"
