#!/usr/bin/env bash
# Create .venv (once) and install pdrop into it, editable, with the extras given (default: test).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# A torch >= 2.11 that is already installed is kept; otherwise 2.13.0 (its CPU wheel where one is on disk).
.venv/bin/python -c 'import torch' 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[${1:-test}]"
