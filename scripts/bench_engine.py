"""Time the engine at several drop ratios on one random-weight preset; print a table, write JSON.

    python scripts/bench_engine.py --preset llava-next-small --ratios 0,0.5 --device cpu

For each ratio: vision, prefill and TTFT (median of --repeats runs after a warm-up), decode
tokens/s, and the measured prefill-time ratio to drop 0 next to the FLOPs ratios (paper formula
and full count). The engine is built into a temporary directory unless --engine is given.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from builder.config import Limits, PyramidSchedule
from builder.convert import build_engine
from builder.engine import Engine
from builder.presets import preset_checkpoint

QUESTION = "What is shown in this image? Answer in one short sentence please."


def make_engine(args, tmp: Path) -> Path:
    if args.engine:
        return Path(args.engine)
    ckpt = preset_checkpoint(args.preset)
    llm = ckpt.llm
    limits = Limits(args.batch, llm.max_position_embeddings - 512, llm.max_position_embeddings)
    build_engine(ckpt, tmp / args.preset, PyramidSchedule.create(llm.n_layers, 0.5), limits, args.dtype,
                 plugins="auto")
    return tmp / args.preset


def measure(engine: Engine, image, ratio: float, args) -> dict:
    prompts, images = [engine.chat_prompt(QUESTION, True)] * args.batch, [image] * args.batch
    runs = []
    for i in range(args.repeats + 1):  # the first run warms up
        results = engine.generate(prompts, images, max_new_tokens=args.max_new_tokens, drop_ratio=ratio)
        if i:
            runs.append(results[0])
    med = {k: statistics.median(r.timings[k] for r in runs) for k in runs[0].timings}
    r = runs[0]
    return {"drop_ratio": ratio, "image_tokens": r.image_tokens, "prompt_tokens": r.prompt_tokens,
            "kept_per_stage": [s.tokens_kept for s in r.stages], "timings": med, "flops": r.flops}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llava-next-small")
    p.add_argument("--engine", help="use this engine directory instead of building the preset")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--ratios", default="0,0.25,0.5,0.75")
    p.add_argument("--image-size", default="672x672", help="WxH of the synthetic image")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    w, h = (int(x) for x in args.image_size.split("x"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine.load(make_engine(args, Path(tmp)), device=args.device)
    name = torch.cuda.get_device_name() if engine.device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    rows = [measure(engine, image, float(r), args) for r in args.ratios.split(",")]

    base = rows[0]["timings"]["prefill_s"]
    print(f"\n{args.engine or args.preset} on {name}, {engine.dtype}, batch {args.batch}, image {args.image_size}, "
          f"median of {args.repeats}")
    print(f"{'drop':>5} {'img tok':>7} {'kept/stage':>18} {'vision ms':>9} {'prefill ms':>10} {'TTFT ms':>8} "
          f"{'tok/s':>7} {'prefill x':>9} {'FLOPs x full':>12} {'FLOPs x paper':>13}")
    for r in rows:
        t, f = r["timings"], r["flops"]
        print(f"{r['drop_ratio']:>5.2f} {r['image_tokens']:>7} {'/'.join(map(str, r['kept_per_stage'])):>18} "
              f"{t['vision_s'] * 1e3:>9.1f} {t['prefill_s'] * 1e3:>10.1f} {t['ttft_s'] * 1e3:>8.1f} "
              f"{t['decode_tokens_per_s']:>7.1f} {t['prefill_s'] / base:>9.3f} {f['full']['ratio']:>12.3f} "
              f"{f['paper']['ratio']:>13.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
