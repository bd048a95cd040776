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


def test_bench_grpc_compares_schedulers_and_writes_table_json_and_plot(engine_dir, tmp_path):
    out = bench(["--engine", str(engine_dir)], tmp_path, "--concurrency", "1,2", "--requests", "3", "--max-tokens",
                "4", "--warmup", "1", "--arrival-ms", "20")
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert {(r["scheduler"], r["drop_ratio"], r["concurrency"]) for r in rows} == {
        (s, d, c) for s in ("inflight", "static") for d in (0.0, 0.5) for c in (1, 2)}
    for r in rows:
        assert r["requests"] == 3 and r["errors"] == 0
        assert 0 < r["ttft_ms"]["p50"] <= r["ttft_ms"]["p99"] and r["output_tokens_per_s"] > 0
    table = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| inflight")]
    assert len(table) == 4 and all(cells[-3].strip() != "—" for cells in table)  # a ratio to static on each
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


def test_bench_prefix_cache_serves_cache_off_and_on_and_prints_their_ratios(engine_dir, tmp_path):
    script = SCRIPT.parent / "bench_prefix_cache.py"
    out = subprocess.run([sys.executable, str(script), "--engine", str(engine_dir), "--turns", "2", "--users", "2",
                          "--image-size", "112x112", "--max-tokens", "2", "--json", str(tmp_path / "p.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "p.json").read_text())
    for name in ("off", "on"):
        assert all(len(t) == 2 and min(t) > 0 for t in results[name]["turns"].values())
        assert results[name]["mix"]["requests"] == 4 and results[name]["mix"]["output_tokens_per_s"] > 0
    mix = [line for line in out.stdout.splitlines() if line.startswith("| on |")]
    assert len(mix) == 1 and float(mix[0].split("|")[-2]) > 0  # the ratio to cache off, measured in this run
