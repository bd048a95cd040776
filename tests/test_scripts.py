"""The GPU session's scripts on a machine without a GPU: gpu_check.sh stops at once, saying why; both
scripts parse; the benchmarks it runs take a prebuilt engine."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a CUDA device gpu_check.sh runs every check")
def test_gpu_check_without_a_device_says_so_and_exits_before_any_work(tmp_path):
    start = time.monotonic()
    done = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=60)
    assert time.monotonic() - start < 30
    assert done.returncode == 1 and done.stderr == ""
    assert done.stdout.startswith("gpu_check: no CUDA device (") and done.stdout.count("\n") == 1, done.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_prepare.sh"])
def test_script_parses(script):
    subprocess.run(["bash", "-n", f"scripts/{script}"], cwd=ROOT, check=True)


@pytest.mark.parametrize("script", ["bench_decode.py", "bench_engine.py"])
def test_benchmark_takes_a_prebuilt_engine(script):
    done = subprocess.run([sys.executable, f"scripts/{script}", "--help"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    assert "--engine ENGINE" in done.stdout
