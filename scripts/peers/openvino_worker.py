"""OpenVINO GenAI side of scripts/bench_peers.py: runs in the peer's own virtual environment.

Reads one JSON command a line on stdin, answers one JSON line on stdout:
  {"op": "one", "image": PATH, "question": Q, "max_new_tokens": N}
      -> {"ttft_s", "decode_tok_s", "prompt_tokens"}                     (VLMPipeline, batch 1)
  {"op": "many", "image": PATH, "questions": [Q, ...], "max_new_tokens": N}
      -> {"wall_s", "output_tokens", "ttft_s": [...], "tokens": [[...]]}  (ContinuousBatchingPipeline)
  {"op": "rss"} -> {"peak_rss_mb"}
  {"op": "precision"} -> {"precision"}: what it computes in and keeps its KV cache in
Never imports pdrop: the peer venv pins its own transformers.
"""
from __future__ import annotations

import json
import resource
import sys
import time

import numpy as np
import openvino as ov
import openvino_genai as og
from PIL import Image


def scheduler_config(latency: bool) -> og.SchedulerConfig:
    """GenAI's defaults but for prefix caching (off: every request pays its own prefill, as pdrop's
    do) and, for one request at a time, the whole prompt in one step (VLMPipeline's latency setting)."""
    sc = og.SchedulerConfig()
    sc.enable_prefix_caching = False
    sc.cache_size = 2  # GB of KV cache: 8 requests of ~3k tokens in f32 with room to spare
    if latency:
        sc.max_num_batched_tokens = 1 << 20
    return sc


def config(max_new_tokens: int) -> og.GenerationConfig:
    cfg = og.GenerationConfig()
    cfg.max_new_tokens = max_new_tokens
    cfg.ignore_eos = True  # every engine decodes the same number of tokens
    return cfg


def image_tensor(path: str) -> ov.Tensor:
    return ov.Tensor(np.array(Image.open(path).convert("RGB"), dtype=np.uint8)[None])


def precisions(props: dict) -> str:
    """The compute and KV-cache precisions: the ones set, else the CPU plugin's defaults on this CPU."""
    core = ov.Core()
    compute, kv = (props.get(k) or str(core.get_property("CPU", k)) for k in ("INFERENCE_PRECISION_HINT",
                                                                              "KV_CACHE_PRECISION"))
    return f"{compute}, KV cache {kv}"


def main() -> int:
    model, threads, precision = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    props = {"INFERENCE_NUM_THREADS": threads}
    if precision == "f32":
        props |= {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}
    one = og.VLMPipeline(model, "CPU", scheduler_config=scheduler_config(latency=True), **props)
    many = og.ContinuousBatchingPipeline(model, scheduler_config(latency=False), "CPU", props)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "one":
            r = one.generate(cmd["question"], images=[image_tensor(cmd["image"])],
                             generation_config=config(cmd["max_new_tokens"]))
            m = r.perf_metrics
            out = {"ttft_s": m.get_ttft().mean / 1e3, "decode_tok_s": m.get_throughput().mean,
                   "prompt_tokens": m.get_num_input_tokens()}
        elif cmd["op"] == "many":
            image = image_tensor(cmd["image"])
            cfg = config(cmd["max_new_tokens"])
            t0 = time.perf_counter()
            handles = [many.add_request(i, q, [image], cfg) for i, q in enumerate(cmd["questions"])]
            first: dict[int, float] = {}
            while many.has_non_finished_requests():
                many.step()
                now = time.perf_counter()
                for i, h in enumerate(handles):
                    if i not in first and h.can_read():
                        first[i] = now - t0
            wall = time.perf_counter() - t0
            tokens = [[t for o in h.read_all() for t in o.generated_ids] for h in handles]
            out = {"wall_s": wall, "output_tokens": sum(map(len, tokens)), "tokens": tokens,
                   "ttft_s": [first.get(i, float("nan")) for i in range(len(handles))]}
        elif cmd["op"] == "precision":
            out = {"precision": precisions(props)}
        else:
            out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
