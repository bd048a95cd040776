"""Decode-step runners: eager (any device) and CUDA-graph replay (CUDA) over static KV caches.

With graphs, each (batch, cache-length bucket) owns one pre-allocated cache and one captured
decode step; later requests of the same bucket reuse both, so nothing is re-captured. The cache
lengths live on the device and the step increments them itself, so a replay needs no host input
but the tokens.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch

from .model import Transformer


class EagerDecoder:
    def __init__(self, llm: Transformer):
        self.llm = llm

    def prepare(self, batch: int, max_len: int) -> None:
        self.llm.setup_caches(batch, max_len)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.llm.decode(tokens)


class _Bucket:
    def __init__(self, caches: list):
        self.caches = caches
        self.graph: torch.cuda.CUDAGraph | None = None
        self.tokens: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None


class GraphDecoder:
    """CUDA-graph decode over bucketed static caches (at most `max_buckets` held at once)."""

    def __init__(self, llm: Transformer, max_seq_len: int, bucket: int = 512, max_buckets: int = 2):
        self.llm, self.max_seq_len, self.bucket, self.max_buckets = llm, max_seq_len, bucket, max_buckets
        self.buckets: OrderedDict[tuple[int, int], _Bucket] = OrderedDict()
        self.captures = 0  # how many graphs were captured, for tests and logs
        self.current: _Bucket | None = None

    def prepare(self, batch: int, max_len: int) -> None:
        length = min(math.ceil(max_len / self.bucket) * self.bucket, self.max_seq_len)
        key = (batch, length)
        if key not in self.buckets:
            while len(self.buckets) >= self.max_buckets:
                self.buckets.popitem(last=False)
            self.llm.setup_caches(batch, length)
            self.buckets[key] = _Bucket([layer.attention.kv_cache for layer in self.llm.layers])
        self.buckets.move_to_end(key)
        self.current = self.buckets[key]
        for layer, cache in zip(self.llm.layers, self.current.caches):
            cache.lengths.zero_()
            layer.attention.kv_cache = cache

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        b = self.current
        if b.graph is None:
            self._capture(b, tokens)
        b.tokens.copy_(tokens)
        b.graph.replay()
        return b.logits

    def _capture(self, b: _Bucket, tokens: torch.Tensor) -> None:
        b.tokens = tokens.clone()
        # Warm-up steps write past the current lengths (masked out, overwritten later); the
        # lengths themselves are put back before capturing.
        saved = [c.lengths.clone() for c in b.caches]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.llm.decode(b.tokens)
        torch.cuda.current_stream().wait_stream(side)
        for cache, lengths in zip(b.caches, saved):
            cache.lengths.copy_(lengths)
        b.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(b.graph):
            b.logits = self.llm.decode(b.tokens)
        self.captures += 1
