#!/usr/bin/env bash
# The test suite on CPU (GPU tests skip, saying why, where there is no CUDA device).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/python -m pytest -q "$@"
