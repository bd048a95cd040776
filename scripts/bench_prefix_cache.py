"""The prefix cache through Triton: several questions about one image, with the cache on and off.

    python scripts/bench_prefix_cache.py --shape llava-next-small            # builds it (random weights)
    python scripts/bench_prefix_cache.py --engine engines/small --turns 4 --users 4

For each server (the engine packaged with the prefix cache off, then on; started in turn on
127.0.0.1), after a warm-up on an image of its own:
- turns: one image, --turns different questions one after another, at drop 0.5 and 0: the time to
  the first token of each; the later questions' mean against the first's;
- mix: --users images x --users questions, sent by --users client threads, the questions of one image
  spread over time (round robin over images): TTFT p50 and output tokens/s.
Printed as tables with the cache-on / cache-off ratios measured in the same run; JSON with --json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from bench_grpc import pct
from PIL import Image

from builder.client.grpc import infer, request_inputs

QUESTIONS = ["What is in this picture?", "Describe the colours you see.", "How many objects are there?",
             "Is there any text in the image?", "What is in the top left corner?", "Is it a photograph?",
             "What would you call this picture?", "Which shape is the largest?"]


def prompt(question: str) -> str:
    return f"USER: <image>\n{question} ASSISTANT:"


def image(seed: int, size: str) -> Image.Image:
    w, h = (int(x) for x in size.split("x"))
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def ask(client, question: str, picture, max_tokens: int, drop: float):
    answer = infer(client, "pdrop", request_inputs(prompt(question), max_tokens, picture, drop_ratio=drop),
                   timeout=900)
    if answer.error is not None:
        raise RuntimeError(f"request failed: {answer.error}")
    return answer


def turns(url: str, n: int, size: str, max_tokens: int, seed: int) -> dict[float, list[float]]:
    """TTFT (s) of n questions about one image, in order, per drop ratio (a new image for each)."""
    import tritonclient.grpc as grpcclient

    out = {}
    with grpcclient.InferenceServerClient(url) as client:
        for k, drop in enumerate((0.5, 0.0)):
            picture = image(seed + k, size)
            out[drop] = [(a.times[0] - a.sent) for a in
                         (ask(client, QUESTIONS[i % len(QUESTIONS)], picture, max_tokens, drop) for i in range(n))]
    return out


def mix(url: str, users: int, size: str, max_tokens: int, seed: int) -> dict:
    """users images x users questions from `users` threads; the questions of an image spread out."""
    import tritonclient.grpc as grpcclient

    pictures = [image(seed + i, size) for i in range(users)]
    jobs = iter([(q, i) for q in range(users) for i in range(users)])
    answers, lock = [], threading.Lock()

    def worker():
        with grpcclient.InferenceServerClient(url) as client:
            while True:
                with lock:
                    job = next(jobs, None)
                if job is None:
                    return
                a = ask(client, QUESTIONS[job[0] % len(QUESTIONS)], pictures[job[1]], max_tokens, 0.5)
                with lock:
                    answers.append(a)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = np.array([a.times[0] - a.sent for a in answers])
    return {"requests": len(answers), "ttft_p50_s": pct(ttft, 50), "wall_s": wall,
            "output_tokens_per_s": sum(len(a.ids) for a in answers) / wall}


def engine_dir(args, tmp: Path) -> Path:
    if args.engine:
        return args.engine
    from bench_engine import build

    from builder.convert.presets import preset_checkpoint

    return build(preset_checkpoint(args.shape), max(8, args.users), "auto", tmp / "engine")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--engine", type=Path, help="engine directory (built with its drop ratio > 0)")
    where.add_argument("--shape", help="a preset to build with random weights, e.g. llava-next-small")
    p.add_argument("--turns", type=int, default=4, help="questions about one image, one after another")
    p.add_argument("--users", type=int, default=4, help="the mix: images, questions each, client threads")
    p.add_argument("--image-size", default="672x672")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    from builder.serve.launcher import TritonServer
    from builder.serve.package import package_repo

    results = {}
    with tempfile.TemporaryDirectory(prefix="pdrop-bench-") as tmp:
        engine = engine_dir(args, Path(tmp))
        for name, tokens in (("off", 0), ("on", None)):
            repo = package_repo(engine, Path(tmp) / name, prefix_cache_tokens=tokens).parent
            with TritonServer(repo) as server:
                ask_once = threading.Thread(target=turns, args=(server.grpc_url, 1, args.image_size, 4, 999))
                ask_once.start()  # the warm-up, on images of its own
                ask_once.join()
                results[name] = {"turns": turns(server.grpc_url, args.turns, args.image_size, args.max_tokens, 0),
                                 "mix": mix(server.grpc_url, args.users, args.image_size, args.max_tokens, 100)}
            print(f"cache {name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)

    print(f"\nturns: one {args.image_size} image, {args.turns} questions in order; TTFT in s")
    print("| drop | cache | first | later (mean) | later / first | later x cache off |")
    print("|---|---|---|---|---|---|")
    for drop in (0.5, 0.0):
        for name in ("off", "on"):
            t = results[name]["turns"][drop]
            later = statistics.mean(t[1:])
            off = statistics.mean(results["off"]["turns"][drop][1:])
            print(f"| {drop} | {name} | {t[0]:.2f} | {later:.2f} | {later / t[0]:.2f} | {later / off:.2f} |")
    print(f"\nmix: {args.users} images x {args.users} questions, {args.users} clients, drop 0.5")
    print("| cache | TTFT p50 s | out tok/s | wall s | tok/s x cache off |")
    print("|---|---|---|---|---|")
    for name in ("off", "on"):
        m = results[name]["mix"]
        print(f"| {name} | {m['ttft_p50_s']:.2f} | {m['output_tokens_per_s']:.2f} | {m['wall_s']:.0f} | "
              f"{m['output_tokens_per_s'] / results['off']['mix']['output_tokens_per_s']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
