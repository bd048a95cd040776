"""pdrop side of scripts/bench_peers.py, in a process of its own (its own peak RSS, its own threads).

Same protocol as openvino_worker.py; commands may carry "drop_ratio" (the engine's schedule at that
ratio). Every request decodes exactly max_new_tokens (end_id -1: EOS does not end it), as the peer's do.
"""
from __future__ import annotations

import json
import resource
import sys
import time

import torch
from PIL import Image

from builder.runtime.engine import Engine
from builder.runtime.sampling import SamplingParams


def main() -> int:
    path, threads, dtype, compiled = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
    torch.set_num_threads(threads)
    # no prefix cache: every request pays its own prefill, as the peer's do with theirs off
    engine = Engine.load(path, device="cpu", dtype=dtype, compiled=compiled, prefix_cache_tokens=0)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "rss":
            print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)
            continue
        if cmd["op"] == "precision":
            print(json.dumps({"precision": f"{engine.precision}, KV cache {engine.pool.k.dtype}"}), flush=True)
            continue
        image = Image.open(cmd["image"]).convert("RGB")
        questions = cmd["questions"] if cmd["op"] == "many" else [cmd["question"]]
        prompts = [engine.chat_prompt(q, True) for q in questions]
        params = [SamplingParams(cmd["max_new_tokens"], end_id=-1) for _ in prompts]
        t0 = time.perf_counter()
        first: dict[int, float] = {}
        results = {}
        for d in engine.stream(prompts, [image] * len(prompts), params=params, drop_ratio=cmd["drop_ratio"]):
            first.setdefault(d.index, time.perf_counter() - t0)
            if d.result is not None:
                results[d.index] = d.result
        wall = time.perf_counter() - t0
        if cmd["op"] == "one":
            r = results[0]
            out = {"ttft_s": r.timings["ttft_s"], "decode_tok_s": r.timings["decode_tokens_per_s"],
                   "prompt_tokens": r.prompt_tokens, "tokens": r.token_ids}
        else:
            out = {"wall_s": wall, "output_tokens": sum(len(r.token_ids) for r in results.values()),
                   "ttft_s": [first[i] for i in range(len(prompts))],
                   "tokens": [results[i].token_ids for i in range(len(prompts))]}
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
