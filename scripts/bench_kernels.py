"""Time one stage boundary (rank + compact) at LLaVA-NeXT-7B shapes on a GPU: the CUDA kernels
against the torch ops, and both against the prefill time of the 8 layers of the stage before it.

    python scripts/bench_kernels.py [--batch 1,8] [--image-tokens 2880] [--dtype bfloat16]

Shapes: 32 heads x 128 (Vicuna-7B; --kv-heads 8 for Mistral), 4096 hidden, 11008 MLP, a 40-token
prompt around the image. Prints a table with ratios; needs CUDA and nvcc.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from builder.convert.plugins import compile_plugins
from builder.format.config import LLMConfig
from builder.network import pyramid
from builder.network.kernels import Kernels
from builder.network.model import TransformerBlock
from builder.network.attention import PagedLayerKV
from builder.runtime.paged_kv import BlockPool, SequenceKV
from builder.network.rope import Rope

BLOCK = 16  # KV block size, the engine's default


def cuda_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="1,8")
    p.add_argument("--image-tokens", type=int, default=2880)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("error: bench_kernels needs a CUDA device", file=sys.stderr)
        return 1
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    major, minor = torch.cuda.get_device_capability()
    kernels = Kernels(compile_plugins([f"{major}{minor}"]))
    cfg = LLMConfig(vocab_size=32064, dim=4096, n_layers=8, n_heads=32, n_kv_heads=args.kv_heads, head_dim=128,
                    intermediate_size=11008)
    layers = [TransformerBlock(cfg).to("cuda", dtype).eval() for _ in range(cfg.n_layers)]
    n, start = args.image_tokens, 35
    length = n + 40
    rope = Rope(cfg.head_dim, cfg.rope_theta, length).cuda()
    cos_sin = rope(torch.arange(length, device="cuda"), dtype)

    print(f"\n{torch.cuda.get_device_name()}, {args.dtype}, {n} image tokens of {length}, "
          f"{cfg.n_heads}/{cfg.n_kv_heads} heads; keep 50%; ms per stage boundary")
    print(f"{'batch':>5} {'torch ops':>10} {'kernels':>9} {'speed-up':>8} {'8-layer prefill':>16} "
          f"{'torch/prefill':>13} {'kernels/prefill':>15}")
    for batch in (int(b) for b in args.batch.split(",")):
        h = torch.randn(batch, length, cfg.dim, device="cuda", dtype=dtype)
        block = layers[0]
        per_layer = math.ceil(length / BLOCK)  # each sequence's blocks in each layer
        pool = BlockPool(batch * len(layers) * per_layer, BLOCK, cfg.n_kv_heads, cfg.head_dim, dtype,
                         torch.device("cuda"))
        for i, layer in enumerate(layers):
            layer.attention.kv_cache = PagedLayerKV(pool, i)
        seqs = [SequenceKV.of(pool.allocate(len(layers) * per_layer), [per_layer] * len(layers)) for _ in range(batch)]

        def rank_torch():
            for b in range(batch):
                q, k = pyramid.query_and_keys(block, cos_sin, h[b:b + 1])
                kept = pyramid.select(pyramid.attention(q, k)[start:start + n], n // 2)
                seq = torch.arange(length, device="cuda")
                h[b:b + 1, torch.cat((seq[:start], kept + start, seq[start + n:]))]

        def rank_kernels():
            qs, ks = zip(*(pyramid.query_and_keys(block, cos_sin, h[b:b + 1]) for b in range(batch)))
            scores = kernels.score(torch.stack(qs), torch.cat(ks), [length] * batch, [start] * batch, [n] * batch)
            kept = kernels.select(scores, [n] * batch, [n // 2] * batch)
            kernels.compact(h.view(-1, cfg.dim), [length] * batch, [start] * batch, [n] * batch, kept,
                            [n // 2] * batch)

        def prefill():
            for b in range(batch):  # the runtime prefills one sequence at a time
                x = h[b:b + 1]
                for layer in layers:
                    x = layer(x, cos_sin, seqs[b])

        with torch.inference_mode():
            t_torch, t_kern = cuda_ms(rank_torch, args.repeats), cuda_ms(rank_kernels, args.repeats)
            t_pre = cuda_ms(prefill, max(3, args.repeats // 5))
        print(f"{batch:>5} {t_torch:>10.3f} {t_kern:>9.3f} {t_torch / t_kern:>8.2f} {t_pre:>16.2f} "
              f"{100 * t_torch / t_pre:>12.2f}% {100 * t_kern / t_pre:>14.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
