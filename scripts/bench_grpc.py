"""gRPC streaming benchmark of a served engine: in-flight against static batching, drop 0 against drop R.

    python scripts/bench_grpc.py --engine engines/small                # packages + serves it, both schedulers
    python scripts/bench_grpc.py --repo models                         # starts tritonserver on a repository
    python scripts/bench_grpc.py --url 127.0.0.1:8001                  # a running server

For each server (with --engine: one per scheduler in --schedulers, started in turn on 127.0.0.1),
each drop ratio (0 and the engine's) and each concurrency level, `--requests` streamed requests
(prompt + image pairs, after a warm-up) are sent by that many client threads, each waiting an
exponential pause (mean --arrival-ms) before every request, so arrivals are staggered. Reported:
TTFT p50/p99, inter-token latency p50/p99, output tokens/s, requests/s and errors, with ratios to
the static scheduler and to drop 0 measured in the same run. Writes JSON and a PNG plot (TTFT
against throughput). Bounded by --deadline-s.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from builder.client.grpc import infer, request_inputs, served_drop_ratio

PROMPTS = ["USER: <image>\nWhat is in this picture? ASSISTANT:",
           "USER: <image>\nDescribe the colours you see. ASSISTANT:",
           "USER: <image>\nHow many objects are there? ASSISTANT:",
           "USER: <image>\nIs there any text in the image? ASSISTANT:"]


def workload(n_images: int, size: str) -> list[tuple[str, Image.Image]]:
    w, h = (int(x) for x in size.split("x"))
    rng = np.random.default_rng(0)
    # images of a few aspect ratios, so requests running together have different image-token counts
    shapes = [(h, w), (h, w * 3 // 4), (h * 3 // 4, w), (h // 2, w)]
    return [(PROMPTS[i % len(PROMPTS)],
             Image.fromarray(rng.integers(0, 256, (*shapes[i % len(shapes)], 3), dtype=np.uint8)))
            for i in range(n_images)]


def pct(x: np.ndarray, q: float) -> float:
    return float(np.percentile(x, q)) if x.size else float("nan")


def run_level(url: str, model: str, work, concurrency: int, requests: int, max_tokens: int, ratio: float,
              arrival_ms: float, deadline: float) -> dict:
    import tritonclient.grpc as grpcclient

    answers, lock, next_job = [], threading.Lock(), iter(range(requests))

    def worker(seed: int):
        pause = random.Random(seed)
        client = grpcclient.InferenceServerClient(url)
        while time.monotonic() < deadline:
            with lock:
                i = next(next_job, None)
            if i is None:
                break
            if arrival_ms:
                time.sleep(pause.expovariate(1000.0 / arrival_ms))
            prompt, image = work[i % len(work)]
            a = infer(client, model, request_inputs(prompt, max_tokens, image, drop_ratio=ratio), request_id=str(i),
                      timeout=600)
            with lock:
                answers.append(a)
        client.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [a for a in answers if a.error is None and a.times]
    ttft = np.array([a.times[0] - a.sent for a in ok]) * 1e3
    itl = np.concatenate([np.diff(a.times) for a in ok if len(a.times) > 1] or [np.zeros(0)]) * 1e3
    tokens = sum(len(a.ids) for a in ok)
    return {"drop_ratio": ratio, "concurrency": concurrency, "requests": len(answers), "errors": len(answers) - len(ok),
            "ttft_ms": {"p50": pct(ttft, 50), "p99": pct(ttft, 99)},
            "itl_ms": {"p50": pct(itl, 50), "p99": pct(itl, 99)},
            "output_tokens_per_s": tokens / wall, "requests_per_s": len(ok) / wall, "wall_s": wall,
            "batch_size_max": max((int(a.last["batch_size"].item()) for a in ok), default=0)}


def print_table(rows: list[dict]) -> None:
    by = {(r["scheduler"], r["drop_ratio"], r["concurrency"]): r for r in rows}
    print(f"\n| scheduler | drop | conc | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | out tok/s | req/s "
          f"| errors | TTFT p50 x static | tok/s x static | TTFT p50 x drop 0 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["drop_ratio"], r["concurrency"], r["scheduler"] == "static")):
        static = by.get(("static", r["drop_ratio"], r["concurrency"]))
        base = by.get((r["scheduler"], 0.0, r["concurrency"]))

        def ratio(other, key, sub=None):
            if other is None or other is r:
                return "—"
            a, b = (x[key][sub] if sub else x[key] for x in (r, other))
            return f"{a / b:.2f}"

        print(f"| {r['scheduler']} | {r['drop_ratio']} | {r['concurrency']} | {r['ttft_ms']['p50']:,.0f} | "
              f"{r['ttft_ms']['p99']:,.0f} | {r['itl_ms']['p50']:,.0f} | {r['itl_ms']['p99']:,.0f} | "
              f"{r['output_tokens_per_s']:.2f} | {r['requests_per_s']:.3f} | {r['errors']} | "
              f"{ratio(static, 'ttft_ms', 'p50')} | {ratio(static, 'output_tokens_per_s')} | "
              f"{ratio(base, 'ttft_ms', 'p50')} |")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted({(r["scheduler"], r["drop_ratio"]) for r in rows}):
        pts = sorted((r for r in rows if (r["scheduler"], r["drop_ratio"]) == key), key=lambda r: r["concurrency"])
        ax.plot([r["output_tokens_per_s"] for r in pts], [r["ttft_ms"]["p50"] for r in pts],
                "o-" if key[0] == "inflight" else "s--", label=f"{key[0]}, drop {key[1]}")
        for r in pts:
            ax.annotate(str(r["concurrency"]), (r["output_tokens_per_s"], r["ttft_ms"]["p50"]), fontsize=8)
    ax.set_xlabel("output tokens/s")
    ax.set_ylabel("TTFT p50 (ms)")
    ax.set_title("latency vs throughput (labels: concurrency)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def servers(args):
    """(scheduler name, gRPC url) of each server to measure, started one at a time."""
    if args.url:
        yield "served", args.url
        return
    from builder.serve.launcher import TritonServer

    if args.repo:
        with TritonServer(args.repo) as server:
            yield "served", server.grpc_url
        return
    from builder.serve.package import package_repo

    with tempfile.TemporaryDirectory(prefix="pdrop-bench-") as tmp:
        for scheduler in args.schedulers.split(","):
            repo = package_repo(args.engine, Path(tmp) / scheduler, scheduler=scheduler).parent
            with TritonServer(repo) as server:
                yield scheduler, server.grpc_url


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--engine", type=Path, help="engine directory: package and serve it once per --schedulers")
    where.add_argument("--repo", type=Path, help="model repository: start tritonserver on it (127.0.0.1, free ports)")
    where.add_argument("--url", help="a running server's gRPC address, host:port")
    p.add_argument("--schedulers", default="inflight,static", help="with --engine: the servers to compare")
    p.add_argument("--model", default="pdrop")
    p.add_argument("--built-ratio", type=float, help="the drop ratio to compare with 0 (default: the served engine's)")
    p.add_argument("--concurrency", default="1,2,4,8,16")
    p.add_argument("--requests", type=int, default=16,
                   help="per concurrency level, ratio and server (at least the concurrency)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--images", type=int, default=4, help="distinct prompt+image pairs")
    p.add_argument("--image-size", default="672x672")
    p.add_argument("--arrival-ms", type=float, default=250.0,
                   help="mean exponential pause before each request of a client thread (0: back to back)")
    p.add_argument("--deadline-s", type=float, default=7200, help="stop sending after this long")
    p.add_argument("--json", type=Path, default=Path("bench_grpc.json"))
    p.add_argument("--plot", type=Path, default=Path("bench_grpc.png"))
    args = p.parse_args()

    import tritonclient.grpc as grpcclient

    work = workload(args.images, args.image_size)
    deadline = time.monotonic() + args.deadline_s
    levels = [int(x) for x in args.concurrency.split(",")]
    rows = []
    for scheduler, url in servers(args):
        if args.built_ratio is not None:
            ratio = args.built_ratio
        else:
            with grpcclient.InferenceServerClient(url) as client:
                ratio = served_drop_ratio(client, args.model)
        run_level(url, args.model, work, 1, args.warmup, args.max_tokens, ratio, 0, deadline)
        for r in [0.0, ratio]:
            for c in levels:
                row = run_level(url, args.model, work, c, max(args.requests, c), args.max_tokens, r, args.arrival_ms,
                                deadline)
                rows.append(row | {"scheduler": scheduler})
                print(f"{scheduler} drop {r} concurrency {c}: TTFT p50 {row['ttft_ms']['p50']:.0f} ms, "
                      f"{row['output_tokens_per_s']:.2f} tok/s, {row['errors']} errors", file=sys.stderr, flush=True)
    print_table(rows)
    args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    plot(rows, args.plot)
    print(f"\nwrote {args.json} and {args.plot}")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
