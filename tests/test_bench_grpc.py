"""The gRPC benchmark runs end to end on a tiny workload against a real server it starts itself."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from builder.serve.launcher import TritonServer
from builder.serve.package import package_repo

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_grpc.py"


def bench(where: list[str], tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *where, "--image-size", "112x112", "--deadline-s", "120",
                           "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png"), *args],
                          capture_output=True, text=True, timeout=300)


def test_bench_grpc_writes_table_json_and_plot(engine_dir, tmp_path):
    repo = package_repo(engine_dir, tmp_path / "models").parent
    out = bench(["--repo", str(repo)], tmp_path, "--concurrency", "1,2", "--requests", "3", "--max-tokens", "4",
                "--warmup", "1")
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert {(r["drop_ratio"], r["concurrency"]) for r in rows} == {(0.0, 1), (0.0, 2), (0.5, 1), (0.5, 2)}
    for r in rows:
        assert r["requests"] == 3 and r["errors"] == 0
        assert 0 < r["ttft_ms"]["p50"] <= r["ttft_ms"]["p99"] and r["output_tokens_per_s"] > 0
    table = out.stdout.splitlines()
    assert any(line.strip().startswith("2 |") for line in table)
    with Image.open(tmp_path / "b.png") as img:
        assert img.format == "PNG" and img.width > 100


def test_bench_grpc_against_a_running_server_reads_its_drop_ratio(engine_dir, tmp_path):
    """`--url` without `--built-ratio`, as the README shows it: the ratio comes from the server."""
    repo = package_repo(engine_dir, tmp_path / "models").parent
    with TritonServer(repo) as server:
        out = bench(["--url", server.grpc_url], tmp_path, "--concurrency", "1", "--requests", "1",
                    "--max-tokens", "2", "--warmup", "0")
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert sorted(r["drop_ratio"] for r in rows) == [0.0, 0.5] and all(r["errors"] == 0 for r in rows)
