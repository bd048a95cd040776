"""Soak a served engine: many streamed requests at a fixed concurrency, some cancelled mid-stream,
then a SIGTERM; checks nothing is lost or corrupted and the server stops cleanly.

    python scripts/soak_grpc.py --engine engines/demo --requests 1000 --concurrency 16 --cancel-every 50

Packages the engine into a temporary model repository and runs `python -m builder serve` on it
(127.0.0.1, free ports), as an operator would. Each request is one of --cases (prompt, image,
max_tokens) cases, streamed; every --cancel-every-th request cancels its stream after the first
token. The reference for each case is its greedy answer served alone before the soak: an answer
that differs is corrupted; a request with no final response or an error is lost. Reports the
model processes' resident memory (the serve process and its children) before and after, and the
seconds from SIGTERM to exit. Exits non-zero when anything was lost or corrupted, or the stop took
--stop-limit-s or more.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from builder.client.grpc import infer, request_inputs
from builder.serve.launcher import free_port
from builder.serve.package import package_repo


def cases(n: int) -> list[tuple[str, Image.Image | None, int]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        if i % 3 == 2:  # text-only prompts mixed in
            out.append((f"USER: tell me about number {i} ASSISTANT:", None, 4 + i % 5))
        else:
            h, w = int(rng.integers(40, 400)), int(rng.integers(40, 400))
            out.append((f"USER: <image>\nWhat is in picture {i}? ASSISTANT:",
                        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), 4 + i % 5))
    return out


def rss_mib(root: int) -> float:
    """Resident memory of `root` and every process below it (the tritonserver and its Python stubs)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total / 1024


def stream_cancelled(url: str, inputs: list) -> bool:
    """Send one streamed request and cancel it after its first response; True if a response came."""
    import tritonclient.grpc as grpcclient

    got = threading.Event()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: got.set())
    client.async_stream_infer("pdrop", inputs, request_id="cancelled")
    ok = got.wait(300)
    client.stop_stream(cancel_requests=True)
    client.close()
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", type=Path, required=True)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--cancel-every", type=int, default=50)
    p.add_argument("--cases", type=int, default=12, help="distinct (prompt, image, max_tokens) cases")
    p.add_argument("--stop-limit-s", type=float, default=5.0)
    args = p.parse_args()
    import tritonclient.grpc as grpcclient

    work = cases(args.cases)
    with tempfile.TemporaryDirectory(prefix="pdrop-soak-") as tmp:
        repo = package_repo(args.engine, Path(tmp) / "models").parent
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "builder", "serve", "--repo", str(repo), "--grpc-port",
                                   str(port), "--http-port", str(free_port())], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            line = server.stdout.readline()
            if not line.startswith("serving"):
                print(f"error: the server did not start: {line.strip()}", file=sys.stderr)
                return 1
            url = f"127.0.0.1:{port}"
            client = grpcclient.InferenceServerClient(url)
            reference = [infer(client, "pdrop", request_inputs(q, n, im)) for q, im, n in work]
            if any(r.error for r in reference):
                print(f"error: a reference request failed: {next(r.error for r in reference if r.error)}",
                      file=sys.stderr)
                return 1
            client.close()
            rss_before = rss_mib(server.pid)
            counts = {"ok": 0, "cancelled": 0, "lost": 0, "corrupted": 0}
            lock, jobs = threading.Lock(), iter(range(args.requests))
            t0 = time.perf_counter()

            def worker():
                c = grpcclient.InferenceServerClient(url)
                while True:
                    with lock:
                        i = next(jobs, None)
                    if i is None:
                        break
                    q, im, n = work[i % len(work)]
                    if args.cancel_every and i % args.cancel_every == args.cancel_every - 1:
                        outcome = "cancelled" if stream_cancelled(url, request_inputs(q, 500, im)) else "lost"
                    else:
                        a = infer(c, "pdrop", request_inputs(q, n, im), timeout=600, request_id=str(i))
                        ref = reference[i % len(work)]
                        outcome = ("lost" if a.error or a.last is None else
                                   "ok" if (a.ids, a.text) == (ref.ids, ref.text) else "corrupted")
                    with lock:
                        counts[outcome] += 1
                        done = sum(counts.values())
                    if done % 100 == 0:
                        print(f"  {done}/{args.requests} requests, {time.perf_counter() - t0:.0f} s", flush=True)
                c.close()

            threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - t0
            rss_after = rss_mib(server.pid)
            start = time.monotonic()
            server.send_signal(signal.SIGTERM)
            code = server.wait(60)
            stop_s = time.monotonic() - start
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
    print(f"\n{args.requests} streamed requests at concurrency {args.concurrency} in {elapsed:.0f} s, "
          f"one in {args.cancel_every} cancelled after its first token")
    print("| requests | exact | cancelled | lost | corrupted | RSS before MiB | RSS after MiB | SIGTERM to exit s | exit |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.requests} | {counts['ok']} | {counts['cancelled']} | {counts['lost']} | {counts['corrupted']} "
          f"| {rss_before:.0f} | {rss_after:.0f} | {stop_s:.1f} | {code} |")
    return int(counts["lost"] > 0 or counts["corrupted"] > 0 or stop_s >= args.stop_limit_s or code != 0)


if __name__ == "__main__":
    sys.exit(main())
