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


def widest(seqs: list["SequenceKV"]) -> list[int]:
    """Per layer, the most blocks any of `seqs` holds there."""
    return [max(s.n_blocks[i] for s in seqs) for i in range(len(seqs[0].n_blocks))]


def blocks_needed(lengths: list[int], max_new_tokens: int, block_size: int) -> list[int]:
    """Blocks per layer for prompts of these per-layer lengths and an answer of up to max_new_tokens."""
    return [math.ceil((n + max_new_tokens) / block_size) for n in lengths]


class BlockPool:
    """The blocks of every layer: k, v (num_blocks + 1, block_size, n_kv_heads, head_dim). Token-major
    inside a block: one token's heads are contiguous, as the decode kernels read them. Allocation is
    first fit: a request's blocks are one run of consecutive ids whenever the pool has a hole that
    large, so that a layer's keys are one stream of memory to read."""

    def __init__(self, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        shape = (num_blocks + 1, block_size, n_kv_heads, head_dim)
        # empty, so that pages never used cost no memory; blocks are zeroed when handed out, because
        # a masked slot still meets its value as 0 * v, and never-written memory may hold NaN
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.block_size, self.num_blocks = block_size, num_blocks
        self.free = torch.ones(num_blocks + 1, dtype=torch.bool)  # host-side; 0 is the null block
        self.free[0] = False
        self.n_free = num_blocks
        self._zero(torch.zeros(1, dtype=torch.long))

    @property
    def block_bytes(self) -> int:
        return 2 * self.k[0].numel() * self.k.element_size()

    def allocate(self, n: int) -> list[int]:
        """n block ids, ascending: the first run of n free consecutive blocks, else the n lowest free."""
        if n > self.n_free:
            raise RuntimeError(f"KV pool: {n} blocks asked, {self.n_free} free")  # callers check first
        edges = torch.diff(self.free.to(torch.int8), prepend=torch.zeros(1, dtype=torch.int8),
                           append=torch.zeros(1, dtype=torch.int8))
        starts, ends = (edges == 1).nonzero()[:, 0], (edges == -1).nonzero()[:, 0]
        fits = (ends - starts >= n).nonzero()[:, 0]
        taken = (torch.arange(n) + starts[fits[0]] if len(fits) else self.free.nonzero()[:n, 0])
        self.free[taken] = False
        self.n_free -= n
        self._zero(taken)
        return taken.tolist()

    def _zero(self, ids: torch.Tensor) -> None:
        ids = ids.to(self.k.device)
        self.k.index_fill_(0, ids, 0)
        self.v.index_fill_(0, ids, 0)

    def release(self, ids: list[int]) -> None:
        self.free[ids] = True
        self.n_free += len(ids)


@dataclass
class SequenceKV:
    """One sequence's blocks and lengths, per layer; host-side bookkeeping."""
    tables: torch.Tensor  # (n_layers, widest) block ids on the host, each layer's row padded with 0
    n_blocks: list[int]  # blocks of each layer
    lengths: list[int]  # tokens written per layer
    offsets: list[int]  # per layer: added to the length to give a decode token's RoPE position
    shared: list[int]  # per layer: its first blocks, read-only, belong to the prefix cache

    @classmethod
    def of(cls, ids: list[int], n_blocks: list[int], prefix: list[list[int]] | None = None,
           prefix_tokens: int = 0) -> "SequenceKV":
        """Blocks `ids` dealt out to the layers, n_blocks[i] to layer i; with a cached `prefix`
        (prefix_cache), layer i's table starts with prefix[i], which holds prefix_tokens tokens."""
        prefix = prefix or []
        shared = [len(prefix[i]) if i < len(prefix) else 0 for i in range(len(n_blocks))]
        tables = torch.zeros(len(n_blocks), max(n_blocks), dtype=torch.long)
        at = 0
        for layer, n in enumerate(n_blocks):
            own = n - shared[layer]
            tables[layer, :n] = torch.tensor((prefix[layer] if shared[layer] else []) + ids[at:at + own])
            at += own
        lengths = [prefix_tokens if s else 0 for s in shared]
        return cls(tables, list(n_blocks), lengths, [0] * len(n_blocks), shared)

    def adopt(self, prefix: list[list[int]], prefix_tokens: int) -> list[int]:
        """Read a cached prefix from prefix[i]'s blocks in layer i, in place of its own first blocks
        there (not written yet); returns those, for the pool."""
        freed = []
        for layer, blocks in enumerate(prefix):
            freed += self.tables[layer, :len(blocks)].tolist()
            self.tables[layer, :len(blocks)] = torch.tensor(blocks)
            self.shared[layer], self.lengths[layer] = len(blocks), prefix_tokens
        return freed

    def block_ids(self) -> list[int]:
        """The blocks this sequence owns: what goes back to the pool when it ends."""
        return [i for layer, n in enumerate(self.n_blocks) for i in self.tables[layer, self.shared[layer]:n].tolist()]


@dataclass
class DecodeBatch:
    """What one decode step reads, as device tensors, B rows (padding rows: null tables, length 0)."""
    flat: torch.Tensor  # every layer's block table, one after another: one host-to-device copy
    tables: list[torch.Tensor]  # views of `flat`, layer i's (B, widths[i]): as wide as that layer holds
    lengths: torch.Tensor  # (n_layers, B): tokens already cached; the new token goes there
    offsets: torch.Tensor  # (n_layers, B)

    @classmethod
    def of(cls, seqs: list[SequenceKV], n_rows: int, device: torch.device,
           widths: list[int] | None = None) -> "DecodeBatch":
        """The batch of `seqs`, padded to n_rows rows and layer i's table to widths[i] blocks (default:
        the most that layer holds in any row): deep stages' tables stay as short as their KV. With
        `widths` given, `seqs` may be empty: every row a padding row."""
        widths = widths or widest(seqs)
        n_layers = len(widths)
        tables = torch.zeros(n_rows, n_layers, max([*widths, *(s.tables.shape[1] for s in seqs)]), dtype=torch.long)
        lengths = torch.zeros(n_layers, n_rows, dtype=torch.long)
        offsets = torch.zeros(n_layers, n_rows, dtype=torch.long)
        for row, s in enumerate(seqs):
            tables[row, :, :s.tables.shape[1]] = s.tables
            lengths[:, row] = torch.tensor(s.lengths)
            offsets[:, row] = torch.tensor(s.offsets)
        flat = torch.cat([tables[:, i, :w].flatten() for i, w in enumerate(widths)]).to(device)
        views = [t.view(n_rows, w) for t, w in zip(flat.split([n_rows * w for w in widths]), widths)]
        return cls(flat, views, lengths.to(device), offsets.to(device))
