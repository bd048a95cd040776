"""How much of a GPU the KV pool takes, planned from a measured peak as vLLM and TensorRT-LLM do.

At load, with the weights in place: note the free memory, then run the largest work the engine
admits once, on a scratch pool: the vision tower on the largest image and a max_input_len prefill
through every stage (its drops included), then a decode step of max_batch_size rows at the full
table width the CUDA graphs use. What that allocates at its peak (activations, workspaces, the
drop's scores) stays reserved: prefill's in the caching allocator, decode's once more in the
graphs' shared memory pool. The KV pool is `fraction` of the rest, in whole blocks, and never more
than max_batch_size sequences of max_seq_len tokens can use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from ..format.errors import EngineError
from ..network.pyramid import ImageSpan
from ..network.vision import VisionEncoder, largest_pinpoint
from .decode import no_tokens, padded
from .paged_kv import BlockPool, SequenceKV

GiB = 1 << 30
DEFAULT_FRACTION = 0.9  # TensorRT-LLM's free_gpu_memory_fraction and vLLM's gpu_memory_utilization


@dataclass(frozen=True)
class MemoryPlan:
    free_bytes: int  # free device memory with the weights loaded
    prefill_peak_bytes: int  # the largest prefill's peak allocation, vision tower included
    decode_peak_bytes: int  # the largest decode step's
    token_bytes: int  # keys and values of one token in every layer
    fraction: float
    tokens: int  # the pool's token slots per layer

    @classmethod
    def of(cls, free: int, prefill_peak: int, decode_peak: int, token_bytes: int, fraction: float,
           block_size: int, most_tokens: int, least_tokens: int) -> "MemoryPlan":
        """The pool for these measurements; EngineError when it cannot hold `least_tokens` a layer."""
        spare = max(0, free - prefill_peak - decode_peak)
        tokens = min(int(spare * fraction) // token_bytes // block_size * block_size, most_tokens)
        plan = cls(free, prefill_peak, decode_peak, token_bytes, fraction, tokens)
        if tokens < least_tokens:
            raise EngineError(f"not enough GPU memory for the KV cache ({plan.describe()}); one sequence of "
                              f"max_seq_len needs {least_tokens} tokens: build with a smaller max_seq_len or "
                              "max_batch_size, or raise kv_cache_memory_fraction")
        return plan

    @property
    def pool_bytes(self) -> int:
        return self.tokens * self.token_bytes

    def describe(self) -> str:
        return (f"{self.free_bytes / GiB:.1f} GiB free after the weights, peaks {self.prefill_peak_bytes / GiB:.2f} "
                f"GiB prefill + {self.decode_peak_bytes / GiB:.2f} GiB decode; KV pool {self.fraction:g} of the "
                f"rest: {self.tokens} tokens a layer, {self.pool_bytes / GiB:.1f} GiB")


def largest_work(llm, vision: VisionEncoder, manifest, pool: BlockPool, table_width: int) -> Iterator[str]:
    """Run the largest prefill, then the largest decode step, on `pool` (a scratch pool that holds one
    max_input_len prompt); yields "prefill", then "decode", each after its work, with nothing of it
    kept alive."""
    cfg, limits, device = manifest.llm, manifest.limits, pool.k.device
    dtype = llm.tok_embeddings.weight.dtype
    llm.attach(pool)
    h, w = largest_pinpoint(vision.spec)
    tiles = torch.zeros(vision.num_patches((h, w)), 3, vision.tile, vision.tile, dtype=dtype, device=device)
    feats, _ = vision(tiles, (h, w))
    n = limits.max_input_len
    n_image = min(feats.shape[0], n - 1)
    embeds = torch.zeros(1, n, cfg.dim, dtype=dtype, device=device)
    embeds[0, 1:1 + n_image] = feats[:n_image]
    del feats, tiles
    per_layer = math.ceil(n / pool.block_size)
    seq = SequenceKV.of(pool.allocate(cfg.n_layers * per_layer), [per_layer] * cfg.n_layers)
    hidden, _ = llm.prefill(embeds, seq, ImageSpan.full(1, n_image, device), manifest.pyramid)
    llm.output(hidden[0, -1])
    del embeds, hidden
    pool.release(seq.block_ids())
    yield "prefill"
    llm.decode(*padded(no_tokens(llm), [], limits.max_batch_size, [table_width] * cfg.n_layers))
    yield "decode"


def plan_memory(llm, vision: VisionEncoder, manifest, block_size: int, table_width: int, device: torch.device,
                fraction: float) -> MemoryPlan:
    """Measure the largest prefill's and decode step's peaks on `device` and plan the pool from them."""
    cfg, limits = manifest.llm, manifest.limits
    dtype = llm.tok_embeddings.weight.dtype
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    scratch = BlockPool(cfg.n_layers * math.ceil(limits.max_input_len / block_size), block_size, cfg.n_kv_heads,
                        cfg.head_dim, dtype, device)
    peaks = {}
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        for phase in largest_work(llm, vision, manifest, scratch, table_width):
            torch.cuda.synchronize(device)
            peaks[phase] = torch.cuda.max_memory_allocated(device) - torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
    del scratch
    torch.cuda.empty_cache()
    token_bytes = cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize
    return MemoryPlan.of(free, peaks["prefill"], peaks["decode"], token_bytes, fraction, block_size,
                         limits.max_batch_size * limits.max_seq_len, limits.max_seq_len)
