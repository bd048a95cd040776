"""Static, pre-allocated KV cache with a length per (layer, sequence).

After PyramidDrop compacts a sequence, deeper layers hold fewer tokens than shallow ones, so each
layer keeps its own lengths. A decode token's RoPE position in layer i is layer i's length (plus,
for a row that keeps original positions, the tokens dropped before layer i).
"""
from __future__ import annotations

import torch
from torch import nn


class LayerKV(nn.Module):
    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("lengths", torch.zeros(batch, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("offsets", torch.zeros(batch, dtype=torch.long, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor, row: int | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store new keys and values; return what attention reads: the prompt's own k, v with no mask
        (causal) for a prefill of `row`, or the whole cache and its mask for a decode step (row None)."""
        if row is not None:
            self.fill(row, k, v)
            return k, v, None
        mask = self.decode_mask()
        return *self.append(k, v), mask

    def fill(self, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Prefill of one sequence: k, v are (1, n_kv, L, head_dim) and become the row's whole cache.
        The prefill sets the row's position offset itself."""
        length = k.shape[2]
        self.k[row, :, :length] = k[0]
        self.v[row, :, :length] = v[0]
        self.lengths[row] = length

    def positions(self) -> torch.Tensor:
        """(B, 1) RoPE position of each row's next token in this layer."""
        return (self.lengths + self.offsets)[:, None]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode: k, v are (B, n_kv, 1, head_dim), written at each row's own length."""
        rows = torch.arange(self.k.shape[0], device=self.k.device)
        self.k[rows, :, self.lengths] = k[:, :, 0]
        self.v[rows, :, self.lengths] = v[:, :, 0]
        self.lengths += 1
        return self.k, self.v

    def decode_mask(self) -> torch.Tensor:
        """(B, 1, 1, max_len) boolean mask of the keys each row may attend to, the new token included."""
        keys = torch.arange(self.max_len, device=self.k.device)
        return (keys[None, :] <= self.lengths[:, None])[:, None, None, :]


class NoCache:
    """Attention over just the keys given, causal, nothing stored: training and cache-less passes."""

    def update(self, k: torch.Tensor, v: torch.Tensor, row: int | None) -> tuple[torch.Tensor, torch.Tensor, None]:
        return k, v, None
