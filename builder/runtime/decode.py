"""Decode-step runners over the paged KV cache: a plain call or a torch.compile'd one (any device),
and CUDA-graph replay of either (CUDA).

A step is a function of device tensors only (tokens, block tables, lengths, offsets: DecodeBatch),
so it can be compiled and captured. Compiled, the small ops between the kernels (norms, RoPE,
residuals, the KV writes) fuse; the kernels stay ops of the graph (runtime.kernels); shapes are
dynamic (batch rows, each layer's table width), so a few compiles serve every step.

The graph runner pads the batch to a bucket (a power of two) and each layer's block table to a
width bucket of its own (a deep stage's table stays as short as what it holds); padding rows read
and write only the null block. Each (batch, widths) bucket is captured once and replayed by every
later step of that shape.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch

from .model import Transformer
from .paged_kv import DecodeBatch, SequenceKV, widest


class Decoder:
    def __init__(self, llm: Transformer, compiled: bool = False):
        self.llm = llm
        self.compiled = torch.compile(llm.decode, dynamic=True) if compiled else None

    def step(self, tokens: torch.Tensor, seqs: list[SequenceKV]) -> torch.Tensor:
        """tokens (B,) of the sequences `seqs` -> logits (B, vocab); their caches grow by one."""
        logits = self.run(tokens, seqs)
        for s in seqs:
            s.lengths = [n + 1 for n in s.lengths]
        return logits

    def run(self, tokens: torch.Tensor, seqs: list[SequenceKV]) -> torch.Tensor:
        if self.compiled is None:
            return self.llm.decode(tokens, DecodeBatch.of(seqs, len(seqs), tokens.device))
        # torch.compile specializes sizes 1 (and 0): with at least 2 rows and 2 blocks a layer, one
        # graph serves every batch
        widths = [max(2, w) for w in widest(seqs)]
        return self.forward(*padded(tokens, seqs, max(2, len(seqs)), widths))[:len(seqs)]

    def forward(self, tokens: torch.Tensor, batch: DecodeBatch) -> torch.Tensor:
        """The step on a batch of device tensors, compiled or not."""
        if self.compiled is None:
            return self.llm.decode(tokens, batch)
        # no "duck sizing": two layers' tables of one width now may differ later (stages, drop ratios)
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            return self.compiled(tokens, batch)


def padded(tokens: torch.Tensor, seqs: list[SequenceKV], rows: int,
           widths: list[int]) -> tuple[torch.Tensor, DecodeBatch]:
    """tokens and the batch of `seqs` padded to `rows` rows (null tables, length 0) and layer i's
    table to widths[i] blocks."""
    batch = DecodeBatch.of(seqs, rows, tokens.device, widths)
    out = torch.zeros(rows, dtype=tokens.dtype, device=tokens.device)
    out[:len(seqs)] = tokens
    return out, batch


class _Graph:
    def __init__(self, batch: DecodeBatch, tokens: torch.Tensor):
        self.batch, self.tokens = batch, tokens
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None


class GraphDecoder(Decoder):
    """CUDA-graph decode, one graph per (batch bucket, per-layer table-width buckets); at most
    `max_graphs` kept."""

    def __init__(self, llm: Transformer, block_size: int, compiled: bool = False, width_bucket_tokens: int = 512,
                 max_graphs: int = 8):
        super().__init__(llm, compiled)
        self.max_graphs = max_graphs
        self.width_bucket = max(1, width_bucket_tokens // block_size)
        self.graphs: OrderedDict[tuple[int, int], _Graph] = OrderedDict()
        self.captures = 0  # how many graphs were captured, for tests and logs

    def run(self, tokens: torch.Tensor, seqs: list[SequenceKV]) -> torch.Tensor:
        rows = 1 << math.ceil(math.log2(len(seqs)))
        widths = [math.ceil(w / self.width_bucket) * self.width_bucket for w in widest(seqs)]
        tokens_in, batch = padded(tokens, seqs, rows, widths)
        key = (rows, tuple(widths))  # layers of one stage share a width: in effect one per stage
        g = self.graphs.get(key)
        if g is None:
            while len(self.graphs) >= self.max_graphs:
                self.graphs.popitem(last=False)
            g = self.graphs[key] = self._capture(batch, tokens_in)
        else:
            for mine, new in ((g.batch.flat, batch.flat), (g.batch.lengths, batch.lengths),
                              (g.batch.offsets, batch.offsets), (g.tokens, tokens_in)):
                mine.copy_(new)
            g.graph.replay()
        self.graphs.move_to_end(key)
        return g.logits[:len(seqs)]

    def _capture(self, batch: DecodeBatch, tokens: torch.Tensor) -> _Graph:
        """Warm up on a side stream, then capture. Warm-up and capture both run the real step (the
        writes go to the rows' next slots, where the step being served writes them anyway)."""
        g = _Graph(batch, tokens)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.forward(g.tokens, g.batch)
        torch.cuda.current_stream().wait_stream(side)
        g.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g.graph):
            g.logits = self.forward(g.tokens, g.batch)
        g.graph.replay()  # capturing does not run the step; this serves it
        self.captures += 1
        return g
