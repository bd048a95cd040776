"""gRPC streaming benchmark of a served engine: drop ratio 0 against the built ratio, one server.

    python scripts/bench_grpc.py --repo models                     # starts tritonserver itself
    python scripts/bench_grpc.py --url 127.0.0.1:8001               # a running server

For each drop ratio and each concurrency level, `--requests` streamed requests (prompt + image
sets, after a warm-up) are sent by that many client threads; reported: TTFT p50/p90/p99,
inter-token latency, output tokens/s, requests/s and errors. Prints a side-by-side table with
ratios, writes JSON and a PNG plot (TTFT against throughput). Bounded by --deadline-s.
"""
from __future__ import annotations

import argparse
import json
import sys
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
    # images of a few aspect ratios, so requests in one batch have different image-token counts
    shapes = [(h, w), (h, w * 3 // 4), (h * 3 // 4, w), (h // 2, w)]
    return [(PROMPTS[i % len(PROMPTS)],
             Image.fromarray(rng.integers(0, 256, (*shapes[i % len(shapes)], 3), dtype=np.uint8)))
            for i in range(n_images)]


def run_level(url: str, model: str, work, concurrency: int, requests: int, max_tokens: int, ratio: float,
              deadline: float) -> dict:
    import tritonclient.grpc as grpcclient

    answers, lock, next_job = [], threading.Lock(), iter(range(requests))

    def worker():
        client = grpcclient.InferenceServerClient(url)
        while time.monotonic() < deadline:
            with lock:
                i = next(next_job, None)
            if i is None:
                break
            prompt, image = work[i % len(work)]
            a = infer(client, model, request_inputs(prompt, max_tokens, image, drop_ratio=ratio), request_id=str(i))
            with lock:
                answers.append(a)
        client.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [a for a in answers if a.error is None and a.times]
    ttft = np.array([a.times[0] - a.sent for a in ok]) * 1e3
    itl = np.concatenate([np.diff(a.times) for a in ok if len(a.times) > 1] or [np.zeros(0)]) * 1e3
    tokens = sum(len(a.ids) for a in ok)

    def pct(x, q):
        return float(np.percentile(x, q)) if x.size else float("nan")

    return {"drop_ratio": ratio, "concurrency": concurrency, "requests": len(answers), "errors": len(answers) - len(ok),
            "ttft_ms": {"p50": pct(ttft, 50), "p90": pct(ttft, 90), "p99": pct(ttft, 99)},
            "itl_ms": {"mean": float(itl.mean()) if itl.size else float("nan"), "p50": pct(itl, 50), "p90": pct(itl, 90)},
            "output_tokens_per_s": tokens / wall, "requests_per_s": len(ok) / wall, "wall_s": wall,
            "batch_size_max": max((int(a.last["batch_size"].item()) for a in ok), default=0)}


def print_table(rows: list[dict], ratios: list[float]) -> None:
    base, drop = ratios
    by = {(r["drop_ratio"], r["concurrency"]): r for r in rows}
    pair = f"{f'drop {base}':>9} {f'drop {drop}':>9}"
    print(f"\n{'':>4} | {'TTFT p50 ms':^24} | {'TTFT p99 ms':^19} | {'ITL mean ms':^19} | "
          f"{'output tokens/s':^24} | {'requests/s':^19} |")
    print(f"{'conc':>4} | {pair} {'x':>4} | {pair} | {pair} | {pair} {'x':>4} | {pair} | errors")
    for c in sorted({r["concurrency"] for r in rows}):
        a, b = by.get((base, c)), by.get((drop, c))
        if not a or not b:
            continue
        def two(key, sub=None):
            x, y = (r[key][sub] if sub else r[key] for r in (a, b))
            return f"{x:>9.1f} {y:>9.1f}", y / x

        ttft, ttft_x = two("ttft_ms", "p50")
        tput, tput_x = two("output_tokens_per_s")
        print(f"{c:>4} | {ttft} {ttft_x:>4.2f} | {two('ttft_ms', 'p99')[0]} | {two('itl_ms', 'mean')[0]} | "
              f"{tput} {tput_x:>4.2f} | {two('requests_per_s')[0]} | {a['errors'] + b['errors']}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for ratio in sorted({r["drop_ratio"] for r in rows}):
        pts = sorted((r for r in rows if r["drop_ratio"] == ratio), key=lambda r: r["concurrency"])
        ax.plot([r["output_tokens_per_s"] for r in pts], [r["ttft_ms"]["p50"] for r in pts], "o-",
                label=f"drop ratio {ratio}")
        for r in pts:
            ax.annotate(str(r["concurrency"]), (r["output_tokens_per_s"], r["ttft_ms"]["p50"]), fontsize=8)
    ax.set_xlabel("output tokens/s")
    ax.set_ylabel("TTFT p50 (ms)")
    ax.set_title("latency vs throughput (labels: concurrency)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--repo", type=Path, help="model repository: start tritonserver on it (127.0.0.1, free ports)")
    where.add_argument("--url", help="a running server's gRPC address, host:port")
    p.add_argument("--model", default="pdrop")
    p.add_argument("--built-ratio", type=float, help="the drop ratio to compare with 0 (default: the served engine's)")
    p.add_argument("--concurrency", default="1,2,4,8")
    p.add_argument("--requests", type=int, default=16, help="per concurrency level and ratio")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--images", type=int, default=4, help="distinct prompt+image pairs")
    p.add_argument("--image-size", default="672x672")
    p.add_argument("--deadline-s", type=float, default=1800, help="stop sending after this long")
    p.add_argument("--json", type=Path, default=Path("bench_grpc.json"))
    p.add_argument("--plot", type=Path, default=Path("bench_grpc.png"))
    args = p.parse_args()

    server = None
    if args.repo:
        from builder.serve.launcher import TritonServer

        server = TritonServer(args.repo).start()
    url = server.grpc_url if server else args.url
    try:
        if args.built_ratio is not None:
            ratio = args.built_ratio
        else:
            import tritonclient.grpc as grpcclient

            with grpcclient.InferenceServerClient(url) as client:
                ratio = served_drop_ratio(client, args.model)
        ratios = [0.0, ratio]
        work = workload(args.images, args.image_size)
        deadline = time.monotonic() + args.deadline_s
        run_level(url, args.model, work, 1, args.warmup, args.max_tokens, ratio, deadline)
        rows = []
        for r in ratios:
            for c in (int(x) for x in args.concurrency.split(",")):
                rows.append(run_level(url, args.model, work, c, args.requests, args.max_tokens, r, deadline))
                print(f"drop {r} concurrency {c}: TTFT p50 {rows[-1]['ttft_ms']['p50']:.1f} ms, "
                      f"{rows[-1]['output_tokens_per_s']:.1f} tok/s, {rows[-1]['errors']} errors", file=sys.stderr)
    finally:
        if server:
            server.stop()
    print_table(rows, ratios)
    args.json.write_text(json.dumps({"url": url, "model": args.model, "args": {k: str(v) for k, v in vars(args).items()},
                                     "rows": rows}, indent=2))
    plot(rows, args.plot)
    print(f"\nwrote {args.json} and {args.plot}")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
