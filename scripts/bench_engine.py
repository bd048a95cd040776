"""pdrop against Hugging Face on one random-weight LLaVA-NeXT shape: TTFT, decode, memory, FLOPs.

    python scripts/bench_engine.py --shape llava-next-vicuna-7b --batch 1,8          # on a GPU
    python scripts/bench_engine.py --shape llava-next-small --batch 1 --max-new-tokens 16   # CPU
    python scripts/bench_engine.py --engine ENGINE_DIR --no-hf --batch 1,8          # a built engine

One image (672x672: 2,928 image tokens with 336-px tiles) + a ~30-token question per sequence.
Rows: (a) transformers' LlavaNextForConditionalGeneration.generate (sdpa, same dtype), (b) pdrop
drop 0, (c) pdrop at each --ratios; for each batch size: vision and TTFT (median of --repeats;
every batch size at every ratio runs once before anything is timed), prefill FLOPs (full count),
decode tokens/s over --max-new-tokens, peak GPU memory, with ratios to (a); on a GPU also the
batch-1 decode roofline (weights + KV bytes over HBM bandwidth) and achieved GB/s, as gpt-fast
reports. Writes JSON with --json.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from builder.convert.build import build_engine
from builder.convert.presets import preset_checkpoint, write_hf_checkpoint
from builder.format.config import Limits, PyramidSchedule
from builder.format.manifest import read_manifest
from builder.runtime.engine import Engine
from builder.network.flops import full_flops
from builder.runtime.sampling import SamplingParams

QUESTION = "What is shown in this image? Answer in one short sentence, please, and be precise."
HBM_GBS = {"H100": 3350, "H200": 4800, "A100": 2039, "L40S": 864, "L4": 300}  # SXM peak GB/s


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gb(device: torch.device, besides: int = 0) -> float:
    """Peak GPU memory since reset_peak, less `besides` bytes held by others."""
    return (torch.cuda.max_memory_allocated() - besides) / 1e9 if device.type == "cuda" else float("nan")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def bench_hf(hf_dir: Path, dtype: torch.dtype, device: torch.device, prompt: str, image, batch: int,
             new_tokens: int, repeats: int) -> dict:
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    pdrop_bytes = torch.cuda.memory_allocated() if device.type == "cuda" else 0  # the engine, loaded beside
    model = LlavaNextForConditionalGeneration.from_pretrained(hf_dir, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device).eval()
    processor = AutoProcessor.from_pretrained(hf_dir)

    def run(n: int) -> float:
        start = time.perf_counter()
        enc = processor(text=[prompt] * batch, images=[image] * batch, return_tensors="pt", padding=True).to(device)
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync(device)
        return time.perf_counter() - start

    reset_peak(device)
    run(2)  # warm-up
    ttft = statistics.median(run(1) for _ in range(repeats))
    total = run(new_tokens)
    out = {"ttft_s": ttft, "decode_tokens_per_s": batch * (new_tokens - 1) / (total - ttft),
           "peak_gb": peak_gb(device, pdrop_bytes)}
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def pdrop_run(engine: Engine, prompt: str, image, batch: int, ratio: float, n: int) -> list:
    params = [SamplingParams(max_new_tokens=n, min_tokens=n) for _ in range(batch)]
    return engine.generate([prompt] * batch, [image] * batch, params=params, drop_ratio=ratio)


def warm_up(engine: Engine, prompt: str, image, batches: list[int], ratios: list[float], new_tokens: int) -> None:
    """Each timed run once, before any timing: requests join the running batch one by one, so a short
    warm-up meets only the first batch sizes, and each new one (a CUDA-graph bucket, GEMM shapes, the
    prefill shapes of each ratio) would initialise inside a timed run."""
    for batch in batches:
        for ratio in ratios:
            pdrop_run(engine, prompt, image, batch, ratio, new_tokens)


def bench_pdrop(engine: Engine, prompt: str, image, batch: int, ratio: float, new_tokens: int, repeats: int) -> dict:
    def run(n: int):
        return pdrop_run(engine, prompt, image, batch, ratio, n)

    reset_peak(engine.device)
    firsts = [run(1)[0] for _ in range(repeats)]
    full = run(new_tokens)
    t = {k: statistics.median(r.timings[k] for r in firsts) for k in ("vision_s", "prefill_s", "ttft_s")}
    return {**t, "decode_tokens_per_s": sum(r.timings["decode_tokens_per_s"] for r in full),
            "peak_gb": peak_gb(engine.device), "image_tokens": full[0].image_tokens,
            "prompt_tokens": full[0].prompt_tokens, "kept_per_stage": [s.tokens_kept for s in full[0].stages]}


def decode_bytes(engine: Engine, context: int) -> tuple[float, float]:
    """Bytes one batch-1 decode step must read: LLM weights, and the KV cache at `context`."""
    cfg, size = engine.manifest.llm, torch.finfo(engine.dtype).bits // 8
    weights = sum(p.numel() for p in engine.llm.parameters()) * size
    return weights, 2 * cfg.n_layers * cfg.kv_size * context * size


def build(ckpt, max_batch: int, dtype_name: str, out: Path) -> Path:
    cfg = ckpt.llm
    limits = Limits(max_batch, cfg.max_position_embeddings - 512, cfg.max_position_embeddings)
    build_engine(ckpt, out, PyramidSchedule.create(cfg.n_layers, 0.5), limits, dtype_name, plugins="auto",
                 progress=False)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", "--preset", dest="shape", default="llava-next-small")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--ratios", default="0.25,0.5,0.75", help="drop ratios besides 0")
    p.add_argument("--batch", default="1")
    p.add_argument("--image-size", default="672x672", help="WxH of the synthetic image")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baseline")
    p.add_argument("--bandwidth-gbs", type=float, help="HBM bandwidth for the roofline (default: by GPU name)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--engine", help="time this built engine (bench_decode.py shares it) instead of "
                                               "building --shape's preset; with the HF baseline, built from it")
    args = p.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          args.device if args.device != "auto" else "cpu")
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    w, h = (int(x) for x in args.image_size.split("x"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
    batches = [int(b) for b in args.batch.split(",")]
    ratios = [0.0] + [float(r) for r in args.ratios.split(",") if r]
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    ckpt = preset_checkpoint(args.shape)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = Path(args.engine) if args.engine else build(ckpt, max(batches), dtype_name, tmp / "engine")
        manifest = read_manifest(path, verify=False)
        if max(batches) > manifest.limits.max_batch_size:
            raise SystemExit(f"error: --batch {max(batches)} exceeds the engine's max batch size "
                             f"{manifest.limits.max_batch_size}")
        if not args.no_hf and manifest.source["fingerprint"] != ckpt.fingerprint:
            raise SystemExit(f"error: the engine was built from {manifest.source['fingerprint']}, the HF baseline "
                             f"would run {ckpt.fingerprint}: pass its --shape, or --no-hf")
        llm_cfg, shape = manifest.llm, manifest.source["checkpoint"].removeprefix("preset:")
        # no hashing of the weights (a benchmark does not vouch for the files), and a pool for the batch
        # (every row a whole sequence), not most of the GPU: peak memory then compares with HF's
        engine = Engine.load(path, device=device, dtype=dtype_name, verify=False,
                             kv_cache_tokens=max(batches) * manifest.limits.max_seq_len)
        prompt = engine.chat_prompt(QUESTION, True)
        hf_dir = None if args.no_hf else write_hf_checkpoint(ckpt, tmp / "hf")
        warm_up(engine, prompt, image, batches, ratios, args.max_new_tokens)
        for batch in batches:
            if hf_dir:
                rows.append({"system": "hf", "batch": batch, "drop_ratio": 0.0,
                             **bench_hf(hf_dir, dtype, device, prompt, image, batch, args.max_new_tokens,
                                        args.repeats)})
            for ratio in ratios:
                rows.append({"system": "pdrop", "batch": batch, "drop_ratio": ratio,
                             **bench_pdrop(engine, prompt, image, batch, ratio, args.max_new_tokens, args.repeats)})
        weights, kv = decode_bytes(engine, rows[-1]["prompt_tokens"] + args.max_new_tokens // 2)

    n_img = rows[-1]["image_tokens"]
    n_text = rows[-1]["prompt_tokens"] - n_img
    bw = args.bandwidth_gbs or next((v for k, v in HBM_GBS.items() if k in name), None)
    print(f"\n{shape} on {name}, {dtype_name}, image {args.image_size} ({n_img} image tokens + {n_text} text), "
          f"{args.max_new_tokens} new tokens, median of {args.repeats}")
    print(f"{'system':>11} {'batch':>5} {'vision ms':>9} {'TTFT ms':>9} {'x HF':>5} {'prefill TFLOP':>13} "
          f"{'decode tok/s':>12} {'x HF':>5} {'peak GB':>7} {'kept per stage':>22}")
    for r in rows:
        base = next((x for x in rows if x["system"] == "hf" and x["batch"] == r["batch"]), None)
        sched = PyramidSchedule.create(llm_cfg.n_layers, r["drop_ratio"]) if r["drop_ratio"] else None
        tflop = r["batch"] * full_flops(llm_cfg, sched, n_img, n_text) / 1e12
        label = "HF" if r["system"] == "hf" else f"pdrop {r['drop_ratio']:.2f}"
        print(f"{label:>11} {r['batch']:>5} {r.get('vision_s', float('nan')) * 1e3:>9.1f} {r['ttft_s'] * 1e3:>9.1f} "
              f"{(r['ttft_s'] / base['ttft_s']) if base else float('nan'):>5.2f} {tflop:>13.2f} "
              f"{r['decode_tokens_per_s']:>12.1f} "
              f"{(r['decode_tokens_per_s'] / base['decode_tokens_per_s']) if base else float('nan'):>5.2f} "
              f"{r['peak_gb']:>7.1f} {'/'.join(map(str, r.get('kept_per_stage', []))):>22}")
    one = [r for r in rows if r["system"] == "pdrop" and r["batch"] == 1 and r["drop_ratio"] == 0.0]
    if bw and one:
        roof = bw * 1e9 / (weights + kv)
        achieved = one[0]["decode_tokens_per_s"] * (weights + kv) / 1e9
        print(f"\nbatch-1 decode roofline: ({weights / 1e9:.2f} GB weights + {kv / 1e9:.2f} GB KV) / {bw:.0f} GB/s = "
              f"{roof:.0f} tok/s; pdrop drop 0 reaches {one[0]['decode_tokens_per_s']:.0f} tok/s = "
              f"{achieved:.0f} GB/s ({100 * achieved / bw:.0f}% of peak)")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
