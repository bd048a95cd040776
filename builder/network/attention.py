"""Attention over the paged KV cache, as a layer sees it (Attention.kv_cache): prefill writes a
sequence's keys and values into its blocks and attends causally; a decode step writes each row's
new token at its length and attends to the row's own blocks, in the decode kernels (network.kernels)
when the engine ships them, else on torch ops.

The pool, a sequence's blocks and a decode batch's tables are the runtime's (runtime/paged_kv.py):
read here through their fields only, so that the network never imports the engine over time.
"""
from __future__ import annotations

import math

import torch


class PagedLayerKV:
    """Layer `index`'s view of the pool, as the attention sees it (Attention.kv_cache). Decode
    attention runs in `kernels` (network.kernels: CUDA or CPU) when the engine ships them, reading
    each row's blocks in place; else on torch ops, gathering them (the reference the kernels are
    tested against). `pool`: runtime.paged_kv.BlockPool."""

    def __init__(self, pool: BlockPool, index: int, kernels=None):
        self.pool, self.index, self.kernels = pool, index, kernels
        self.batch: DecodeBatch | None = None  # set for each decode step by the decoder

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: SequenceKV | None) -> torch.Tensor:
        """Prefill of `seq` (q, k, v: (1, heads, L, hd)): k, v written to its blocks after what the
        layer already holds (a cached prefix, whole blocks), attention causal over both.
        Decode (seq None; (B, heads, 1, hd)): k, v written at each row's length, each row attending
        to its own blocks up to and including the new token."""
        if seq is not None:
            held = seq.lengths[self.index]
            self.fill(seq, k, v)
            if not held:
                return sdpa(q, k, v, causal=True)
            table = seq.tables[self.index, :held // self.pool.block_size].to(k.device)
            k, v = (torch.cat((t[table].view(1, held, *t.shape[2:]).transpose(1, 2), new), dim=2)
                    for t, new in ((self.pool.k, k), (self.pool.v, v)))
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(held)
            return sdpa(q, k, v, mask=mask)
        pool, bs = self.pool, self.pool.block_size
        table, length = self.batch.tables[self.index], self.batch.lengths[self.index]  # (B, W_layer), (B,)
        rows = torch.arange(table.shape[0], device=table.device)
        block = table[rows, length // bs]
        pool.k[block, length % bs] = k[:, :, 0]
        pool.v[block, length % bs] = v[:, :, 0]
        if self.kernels is not None:
            return self.kernels.paged_decode(q[:, :, 0].contiguous(), pool.k, pool.v, table, length + 1)[:, :, None]
        return self._attend_gathered(q, table, length)

    def _attend_gathered(self, q: torch.Tensor, table: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """Every row's table gathered (index_select copies whole blocks) and masked past its length."""
        pool, bs = self.pool, self.pool.block_size
        b, w = table.shape
        k, v = (t.index_select(0, table.flatten()).view(b, w * bs, *t.shape[2:]).transpose(1, 2)
                for t in (pool.k, pool.v))
        keys = torch.arange(w * bs, device=table.device)
        mask = (keys[None, :] <= length[:, None])[:, None, None, :]  # (B, 1, 1, W*bs), the new token included
        return decode_sdpa(q, k, v, mask)

    def fill(self, seq: SequenceKV, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v after the tokens the layer holds (none, or a cached prefix of whole blocks)."""
        length, bs, held = k.shape[2], self.pool.block_size, seq.lengths[self.index]
        n = math.ceil(length / bs)
        table = seq.tables[self.index, held // bs:held // bs + n].to(k.device)
        for src, dst in ((k, self.pool.k), (v, self.pool.v)):
            tokens = torch.nn.functional.pad(src[0].transpose(0, 1), (0, 0, 0, 0, 0, n * bs - length))
            dst[table] = tokens.view(n, bs, *tokens.shape[1:])  # (n*bs, n_kv, hd) tokens as n blocks
        seq.lengths[self.index] = held + length

    def positions(self) -> torch.Tensor:
        """(B, 1) RoPE position of each row's next token in this layer."""
        return (self.batch.lengths[self.index] + self.batch.offsets[self.index])[:, None]


class NoCache:
    """Attention over just the keys given, causal, nothing stored: training and cache-less passes."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: SequenceKV | None) -> torch.Tensor:
        return sdpa(q, k, v, causal=True)


def decode_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One query token per row (q: (B, H, 1, hd)) over (B, KV, n, hd) keys: the query heads sharing a
    KV head go in as that head's query rows, so each key and value is read once, not H / KV times."""
    b, heads, _, hd = q.shape
    y = sdpa(q.view(b, k.shape[1], heads // k.shape[1], hd), k, v, mask=mask)  # (B, KV, H/KV, hd)
    return y.view(b, heads, 1, hd)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
         mask: torch.Tensor | None = None) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                            enable_gqa=True)
