"""KV capacity at a fixed pool: how many 672x672 requests the scheduler admits at once, drop 0 vs drop R.

    python scripts/bench_kv_capacity.py --shape llava-next-vicuna-7b --pool-gib 100
    python scripts/bench_kv_capacity.py --shape llava-next-small --pool-gib 4

No weights and no GPU: the pool is allocated on the meta device and the real scheduler admits
prepared requests (real token counts from the preset's processor) until its blocks run out.
Prints KV bytes per request per pyramid stage and the admitted counts; writes JSON with --json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from builder.convert.presets import preset_checkpoint
from builder.format.config import Limits, PyramidSchedule
from builder.runtime.engine import Request
from builder.runtime.paged_kv import BlockPool, blocks_needed, layer_lengths
from builder.runtime.sampling import SamplingParams
from builder.runtime.scheduler import Scheduler

PROMPT = "USER: <image>\nDescribe the picture in detail. ASSISTANT:"


def capacity(cfg, schedule: PyramidSchedule, input_ids: torch.Tensor, n_image: int, max_tokens: int,
             pool_bytes: int, block_size: int, dtype: torch.dtype) -> dict:
    block_bytes = 2 * cfg.n_kv_heads * block_size * cfg.head_dim * torch.finfo(dtype).bits // 8
    pool = BlockPool(pool_bytes // block_bytes, block_size, cfg.n_kv_heads, cfg.head_dim, dtype, torch.device("meta"))
    assert pool.block_bytes == block_bytes
    engine = SimpleNamespace(manifest=SimpleNamespace(llm=cfg, limits=Limits(1 << 20, 1 << 20, 1 << 21)))
    scheduler = Scheduler(engine, pool, max_batch=1 << 20, max_queued=1 << 20)
    req = Request(input_ids, SamplingParams(max_new_tokens=max_tokens), schedule, n_image=n_image)
    lengths = layer_lengths(schedule, cfg.n_layers, req.prompt_tokens, n_image)
    per_layer = blocks_needed(lengths, max_tokens, block_size)
    fit = pool.num_blocks // sum(per_layer)
    for _ in range(fit + 2):
        scheduler.submit(req, lambda event: None)
    admitted = scheduler.admit()
    ends = [0, *schedule.layers, cfg.n_layers]
    stages = [{"layers": f"{a}-{b - 1}", "tokens": lengths[a] + max_tokens,
               "kv_bytes": sum(per_layer[a:b]) * pool.block_bytes} for a, b in zip(ends, ends[1:])]
    return {"drop_ratio": schedule.drop_ratio, "admitted": admitted, "blocks_per_request": sum(per_layer),
            "kv_bytes_per_request": sum(per_layer) * pool.block_bytes, "stages": stages,
            "pool_blocks": pool.num_blocks, "blocks_left": pool.n_free}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llava-next-vicuna-7b")
    p.add_argument("--pool-gib", type=float, default=100.0, help="KV pool size")
    p.add_argument("--drop-ratio", type=float, default=0.5)
    p.add_argument("--image-size", default="672x672")
    p.add_argument("--max-tokens", type=int, default=32, help="answer length each request reserves")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    ckpt = preset_checkpoint(args.shape)
    cfg = ckpt.llm
    w, h = (int(x) for x in args.image_size.split("x"))
    image = Image.fromarray(np.zeros((h, w, 3), dtype=np.uint8))
    input_ids = ckpt.processor(text=PROMPT, images=image, return_tensors="pt").input_ids[0]
    n_image = int((input_ids == ckpt.hf_config.image_token_id).sum())
    pool_bytes = int(args.pool_gib * (1 << 30))
    rows = [capacity(cfg, PyramidSchedule.create(cfg.n_layers, r), input_ids, n_image, args.max_tokens, pool_bytes,
                     args.block_size, getattr(torch, args.dtype)) for r in (0.0, args.drop_ratio)]
    print(f"{args.shape}: {cfg.n_layers} layers, {cfg.n_kv_heads} KV heads x {cfg.head_dim}, {args.dtype}; "
          f"{args.image_size} image = {n_image} image tokens + {input_ids.numel() - n_image} text, "
          f"{args.max_tokens} new; pool {args.pool_gib:g} GiB, {args.block_size}-token blocks")
    print("\n| drop | stage layers: tokens held, KV MiB | KV MiB per request | admitted at once | x drop 0 |")
    print("|---|---|---|---|---|")
    for r in rows:
        stages = "; ".join(f"{s['layers']}: {s['tokens']}, {s['kv_bytes'] / 2**20:.0f}" for s in r["stages"])
        print(f"| {r['drop_ratio']} | {stages} | {r['kv_bytes_per_request'] / 2**20:.0f} | {r['admitted']} | "
              f"{r['admitted'] / rows[0]['admitted']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "n_image": n_image,
                                         "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
