"""Decode-step runners over the paged KV cache: a plain call or a torch.compile'd one (any device),
and CUDA-graph replay of either (CUDA, with the engine's kernels).

A step is a function of device tensors only (tokens, block tables, lengths, offsets: DecodeBatch),
so it can be compiled and captured. Compiled, the small ops between the kernels (norms, RoPE,
residuals, the KV writes) fuse; the kernels stay ops of the graph (network.kernels); shapes are
dynamic (batch rows, each layer's table width), so one compile serves every step.

The graph runner keeps one graph per batch bucket, every layer's table as wide as max_seq_len: the
paged-decode kernel reads only each row's own keys (blocks past a row's length cost an empty
chunk), so one graph serves every length, stage and drop ratio, and every graph is captured at
start-up (warm_up), none while serving. Padding rows read and write only the null block.
"""
from __future__ import annotations

import math

import torch

from ..network.model import Transformer
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

    def warm_up(self) -> None:
        """Compile the step now (tens of seconds), not at the first request: one step of padding rows."""
        if self.compiled is not None:
            self.forward(*padded(no_tokens(self.llm), [], 2, [2] * len(self.llm.layers)))


def padded(tokens: torch.Tensor, seqs: list[SequenceKV], rows: int,
           widths: list[int]) -> tuple[torch.Tensor, DecodeBatch]:
    """tokens and the batch of `seqs` padded to `rows` rows (null tables, length 0) and layer i's
    table to widths[i] blocks."""
    batch = DecodeBatch.of(seqs, rows, tokens.device, widths)
    out = torch.zeros(rows, dtype=tokens.dtype, device=tokens.device)
    out[:len(seqs)] = tokens
    return out, batch


def no_tokens(llm: Transformer) -> torch.Tensor:
    """The tokens of no sequence, on the model's device: padded() makes every row a padding row."""
    return torch.zeros(0, dtype=torch.long, device=llm.tok_embeddings.weight.device)


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes a graph is captured for: the powers of two below max_batch, and max_batch."""
    return [1 << i for i in range(max(0, math.ceil(math.log2(max_batch))))] + [max_batch]


class _Graph:
    """One captured step and its input tensors, which a replay reads: new values are copied in."""

    def __init__(self, tokens: torch.Tensor, batch: DecodeBatch):
        self.tokens, self.batch = tokens, batch
        self.graph = torch.cuda.CUDAGraph()
        self.logits: torch.Tensor | None = None
        self.seqs: list[SequenceKV] = []  # whose tables `batch` holds

    def load(self, tokens: torch.Tensor, seqs: list[SequenceKV]) -> None:
        """Copy in this step's tokens and lengths; the block tables only when the rows changed (a
        sequence's table is fixed from admission to its end)."""
        n, rows = len(seqs), self.tokens.shape[0]
        self.tokens[:n].copy_(tokens)
        if len(seqs) != len(self.seqs) or any(a is not b for a, b in zip(seqs, self.seqs)):
            new = DecodeBatch.of(seqs, rows, tokens.device, [t.shape[1] for t in self.batch.tables])
            for mine, theirs in ((self.batch.flat, new.flat), (self.batch.lengths, new.lengths),
                                 (self.batch.offsets, new.offsets)):
                mine.copy_(theirs)
            self.seqs = list(seqs)
        else:
            self.batch.lengths[:, :n].copy_(torch.tensor([s.lengths for s in seqs]).T)


class GraphDecoder(Decoder):
    """CUDA-graph decode: a graph per batch bucket (batch_buckets), captured by warm_up into one
    shared memory pool (graphs never run at once, and each step's logits are consumed before the
    next) on one capture stream."""

    def __init__(self, llm: Transformer, table_width: int, max_batch: int, compiled: bool = False):
        """Every layer's table `table_width` blocks wide: as many as max_seq_len tokens take."""
        super().__init__(llm, compiled)
        self.widths = [table_width] * len(llm.layers)
        self.buckets = batch_buckets(max_batch)
        self.stream = torch.cuda.Stream()
        self.memory = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, _Graph] = {}
        self.captures = 0  # graphs captured, for tests and logs

    def warm_up(self) -> None:
        """Capture every bucket's graph, the largest first so that the smaller ones reuse its memory."""
        for rows in reversed(self.buckets):
            self.graphs[rows] = self._capture(*padded(no_tokens(self.llm), [], rows, self.widths))

    def run(self, tokens: torch.Tensor, seqs: list[SequenceKV]) -> torch.Tensor:
        g = self.graphs[next(b for b in self.buckets if b >= len(seqs))]
        g.load(tokens, seqs)
        g.graph.replay()
        return g.logits[:len(seqs)]

    def _capture(self, tokens: torch.Tensor, batch: DecodeBatch) -> _Graph:
        """Run once on the capture stream (lazy initialisations, a compile, happen outside the
        capture), then capture. Both write only the null block: every row is a padding row."""
        g = _Graph(tokens, batch)
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            self.forward(tokens, batch)
        torch.cuda.current_stream().wait_stream(self.stream)
        with torch.cuda.graph(g.graph, pool=self.memory, stream=self.stream):
            g.logits = self.forward(tokens, batch)
        self.captures += 1
        return g
