"""One decode step over the paged KV cache: the engine's decode kernel (blocks read in place)
against torch ops (blocks gathered first).

    python scripts/bench_decode.py --shape llava-next-small --batch 1,4,8     # CPU, ~3 min
    python scripts/bench_decode.py --device cuda --engine ENGINE_DIR --batch 1,8   # a built engine

Builds the random-weight preset (or takes --engine), prefills one 672x672 request (2,928 image
tokens) per drop ratio and copies its blocks to --batch distinct sequences of the pool, then times
decode steps two ways in the same run: the kernel (pdrop_cpu_paged_decode on a CPU,
pdrop_paged_decode on CUDA: each row's blocks read in place through its table) and torch ops (every
row's table copied out with index_select, then one masked attention). Prints ms per step (median of
--steps) and the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from builder.convert.build import build_engine
from builder.convert.presets import preset_checkpoint
from builder.format.config import Limits, PyramidSchedule
from builder.runtime.engine import Engine
from builder.runtime.paged_kv import DecodeBatch, SequenceKV
from builder.network.pyramid import ImageSpan
from builder.runtime.sampling import SamplingParams


def sequences(engine: Engine, image, drop: float, n: int) -> list[SequenceKV]:
    """n sequences holding the same prefilled request, each in blocks of its own."""
    req = engine.prepare(engine.chat_prompt("What is shown here?", True), image, SamplingParams(32), drop)
    n_blocks = engine.scheduler.blocks_for(req)
    seqs = [SequenceKV.of(engine.pool.allocate(sum(n_blocks)), n_blocks) for _ in range(n)]
    embeds, _ = engine.embed(req)
    span = ImageSpan.full(req.image_start, req.n_image, engine.device) if req.n_image else None
    engine.llm.prefill(embeds, seqs[0], span, req.schedule)
    src = torch.tensor(seqs[0].block_ids())
    for s in seqs[1:]:
        dst = torch.tensor(s.block_ids())
        engine.pool.k[dst], engine.pool.v[dst] = engine.pool.k[src], engine.pool.v[src]
        s.lengths, s.offsets = list(seqs[0].lengths), list(seqs[0].offsets)
    return seqs


def step_ms(engine: Engine, seqs: list[SequenceKV], kernels, steps: int) -> float:
    """ms per step with decode attention in `kernels` (None: torch ops)."""
    for layer in engine.llm.layers:
        layer.attention.kv_cache.kernels = kernels
    tokens = torch.zeros(len(seqs), dtype=torch.long, device=engine.device)
    times = []
    for _ in range(steps + 1):  # the first is a warm-up
        start = time.perf_counter()
        engine.llm.decode(tokens, DecodeBatch.of(seqs, len(seqs), engine.device))
        engine.sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def build(shape: str, max_batch: int, device: str, out: Path) -> Path:
    """The random-weight preset `shape` as an engine at `out`: bfloat16 with the CUDA kernels for a CUDA run."""
    ckpt = preset_checkpoint(shape)
    cfg = ckpt.llm
    limits = Limits(max_batch, cfg.max_position_embeddings - 512, cfg.max_position_embeddings)
    cuda = device.startswith("cuda")
    build_engine(ckpt, out, PyramidSchedule.create(cfg.n_layers, 0.5), limits, "bfloat16" if cuda else "float32",
                 progress=False, plugins="auto" if cuda else "off")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", "--preset", dest="shape", default="llava-next-small")
    p.add_argument("--batch", default="1,4,8")
    p.add_argument("--ratios", default="0,0.5")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--engine", type=Path, help="time this built engine (bench_engine.py shares it) instead of "
                                               "building --shape's preset")
    args = p.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (672, 672, 3), dtype=np.uint8))
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        path = args.engine or build(args.shape, max(batches), args.device, Path(tmp) / "engine")
        # a benchmark times the engine, it does not vouch for its files: no hashing of 13.5 GB at 7B
        engine = Engine.load(path, device=args.device, verify=False)
        if max(batches) > engine.manifest.limits.max_batch_size:
            raise SystemExit(f"error: --batch {max(batches)} exceeds the engine's max batch size "
                             f"{engine.manifest.limits.max_batch_size}")
        if engine.llm.decode_kernels is None:
            raise SystemExit("error: the engine has no decode kernels (no C++ compiler, or nvcc on CUDA)")
        for drop in (float(r) for r in args.ratios.split(",")):
            seqs = sequences(engine, image, drop, max(batches))
            for b in batches:
                gathered, in_place = (step_ms(engine, seqs[:b], kernels, args.steps)
                                      for kernels in (None, engine.llm.decode_kernels))
                rows.append((drop, b, seqs[0].lengths[0], seqs[0].lengths[-1], gathered, in_place))
            for s in seqs:
                engine.pool.release(s.block_ids())
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    shape = engine.manifest.source["checkpoint"].removeprefix("preset:")
    print(f"\n{shape} on {name}, {engine.dtype}: ms per decode step, median of {args.steps}")
    print("| drop | batch | KV tokens, first / last layer | torch ops (gathered) ms | kernel (in place) ms "
          "| × torch ops |")
    print("|---|---|---|---|---|---|")
    for drop, b, first, last, gathered, in_place in rows:
        print(f"| {drop} | {b} | {first} / {last} | {gathered:.0f} | {in_place:.0f} | {in_place / gathered:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
