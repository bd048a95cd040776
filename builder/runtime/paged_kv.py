"""A paged KV cache whose deeper pyramid stages hold only the surviving tokens.

One pool of fixed-size blocks; a block holds `block_size` tokens' keys and values of ONE layer.
A sequence owns, for every layer, a block table sized to what that layer holds: the prompt after
the drops before it, plus the answer. Layers of one stage hold the same tokens, so their tables
have one length (the stage's block table, one row per layer). Blocks are reserved for the whole
answer at admission (TensorRT-LLM's GUARANTEED_NO_EVICT): a running sequence never runs out.

Block 0 is the null block: padding in batched tables points at it; it is written to (by padded
rows) and never read unmasked.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..format.config import PyramidSchedule


def layer_lengths(schedule: PyramidSchedule, n_layers: int, n_prompt: int, n_image: int) -> list[int]:
    """Prompt tokens each layer holds after the drops before it."""
    return [n_prompt - n_image + n for n in schedule.tokens_per_layer(n_image, n_layers)]


def blocks_needed(lengths: list[int], max_new_tokens: int, block_size: int) -> list[int]:
    """Blocks per layer for prompts of these per-layer lengths and an answer of up to max_new_tokens."""
    return [math.ceil((n + max_new_tokens) / block_size) for n in lengths]


class BlockPool:
    """The blocks of every layer: k, v (num_blocks + 1, block_size, n_kv_heads, head_dim). Token-major
    inside a block, so that a row's gathered blocks are one (tokens, heads, head_dim) run: attention
    reads them through a transposed view, with no second copy."""

    def __init__(self, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        shape = (num_blocks + 1, block_size, n_kv_heads, head_dim)
        # empty, so that pages never used cost no memory; blocks are zeroed when handed out, because
        # a masked slot still meets its value as 0 * v, and never-written memory may hold NaN
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.block_size, self.num_blocks = block_size, num_blocks
        self.free_ids = list(range(num_blocks, 0, -1))  # a stack; 0 is the null block
        self._zero([0])

    @property
    def n_free(self) -> int:
        return len(self.free_ids)

    @property
    def block_bytes(self) -> int:
        return 2 * self.k[0].numel() * self.k.element_size()

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_ids):
            raise RuntimeError(f"KV pool: {n} blocks asked, {len(self.free_ids)} free")  # callers check first
        taken, self.free_ids = self.free_ids[len(self.free_ids) - n:], self.free_ids[:len(self.free_ids) - n]
        self._zero(taken)
        return taken

    def _zero(self, ids: list[int]) -> None:
        index = torch.tensor(ids, dtype=torch.long, device=self.k.device)
        self.k.index_fill_(0, index, 0)
        self.v.index_fill_(0, index, 0)

    def release(self, ids: list[int]) -> None:
        self.free_ids.extend(ids)


@dataclass
class SequenceKV:
    """One sequence's blocks and lengths, per layer; host-side bookkeeping."""
    tables: torch.Tensor  # (n_layers, widest) block ids on the host, each layer's row padded with 0
    n_blocks: list[int]  # blocks of each layer
    lengths: list[int]  # tokens written per layer
    offsets: list[int]  # per layer: added to the length to give a decode token's RoPE position

    @classmethod
    def of(cls, ids: list[int], n_blocks: list[int]) -> "SequenceKV":
        """Blocks `ids` dealt out to the layers, n_blocks[i] to layer i."""
        tables = torch.zeros(len(n_blocks), max(n_blocks), dtype=torch.long)
        at = 0
        for layer, n in enumerate(n_blocks):
            tables[layer, :n] = torch.tensor(ids[at:at + n])
            at += n
        return cls(tables, list(n_blocks), [0] * len(n_blocks), [0] * len(n_blocks))

    def block_ids(self) -> list[int]:
        return [i for layer, n in enumerate(self.n_blocks) for i in self.tables[layer, :n].tolist()]


@dataclass
class DecodeBatch:
    """What one decode step reads, as device tensors, B rows (padding rows: null tables, length 0)."""
    tables: torch.Tensor  # (n_layers, B, width)
    lengths: torch.Tensor  # (n_layers, B): tokens already cached; the new token goes there
    offsets: torch.Tensor  # (n_layers, B)

    @classmethod
    def of(cls, seqs: list[SequenceKV], n_rows: int, device: torch.device, width: int | None = None
           ) -> "DecodeBatch":
        """The batch of `seqs`, padded to n_rows rows and to tables `width` blocks wide (default: the widest)."""
        width = width or max(s.tables.shape[1] for s in seqs)
        n_layers = seqs[0].tables.shape[0]
        tables = torch.zeros(n_layers, n_rows, width, dtype=torch.long)
        lengths = torch.zeros(n_layers, n_rows, dtype=torch.long)
        offsets = torch.zeros(n_layers, n_rows, dtype=torch.long)
        for row, s in enumerate(seqs):
            tables[:, row, :s.tables.shape[1]] = s.tables
            lengths[:, row] = torch.tensor(s.lengths)
            offsets[:, row] = torch.tensor(s.offsets)
        return cls(tables.to(device), lengths.to(device), offsets.to(device))


class PagedLayerKV:
    """Layer `index`'s view of the pool, as the attention sees it (Attention.kv_cache)."""

    def __init__(self, pool: BlockPool, index: int):
        self.pool, self.index = pool, index
        self.batch: DecodeBatch | None = None  # set for each decode step by the decoder

    def update(self, k: torch.Tensor, v: torch.Tensor, seq: SequenceKV | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Prefill of `seq` (k, v: (1, n_kv, L, hd)): written to its blocks, attention over them
        causal. Decode (seq None; k, v: (B, n_kv, 1, hd)): written at each row's length, attention
        over each row's blocks gathered, masked past its length."""
        if seq is not None:
            self.fill(seq, k, v)
            return k, v, None
        pool, bs = self.pool, self.pool.block_size
        table, length = self.batch.tables[self.index], self.batch.lengths[self.index]  # (B, W), (B,)
        rows = torch.arange(table.shape[0], device=table.device)
        block = table[rows, length // bs]
        pool.k[block, length % bs] = k[:, :, 0]
        pool.v[block, length % bs] = v[:, :, 0]
        b, w = table.shape
        # index_select copies whole blocks (memcpy), several times faster than advanced indexing here
        k_all = pool.k.index_select(0, table.flatten()).view(b, w * bs, *k.shape[1::2]).transpose(1, 2)
        v_all = pool.v.index_select(0, table.flatten()).view(b, w * bs, *v.shape[1::2]).transpose(1, 2)
        keys = torch.arange(w * bs, device=table.device)
        mask = (keys[None, :] <= length[:, None])[:, None, None, :]  # (B, 1, 1, W*bs), the new token included
        return k_all, v_all, mask

    def fill(self, seq: SequenceKV, k: torch.Tensor, v: torch.Tensor) -> None:
        length, bs = k.shape[2], self.pool.block_size
        n = math.ceil(length / bs)
        table = seq.tables[self.index, :n].to(k.device)
        for src, dst in ((k, self.pool.k), (v, self.pool.v)):
            tokens = torch.nn.functional.pad(src[0].transpose(0, 1), (0, 0, 0, 0, 0, n * bs - length))
            dst[table] = tokens.view(n, bs, *tokens.shape[1:])  # (n*bs, n_kv, hd) tokens as n blocks
        seq.lengths[self.index] = length

    def positions(self) -> torch.Tensor:
        """(B, 1) RoPE position of each row's next token in this layer."""
        return (self.batch.lengths[self.index] + self.batch.offsets[self.index])[:, None]


class NoCache:
    """Attention over just the keys given, causal, nothing stored: training and cache-less passes."""

    def update(self, k: torch.Tensor, v: torch.Tensor, seq: SequenceKV | None
               ) -> tuple[torch.Tensor, torch.Tensor, None]:
        return k, v, None
