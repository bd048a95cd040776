"""Rotate-half rotary position embeddings (the Llama / Hugging Face convention)."""
from __future__ import annotations

import torch
from torch import nn


class Rope(nn.Module):
    """Rotate-half RoPE tables for every position up to max_len."""

    def __init__(self, head_dim: int, theta: float, max_len: int):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_len, head_dim)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """pos: (T,) for one sequence or (B, 1) per row; returns tables broadcastable to (B, H, T, hd)."""
        cos, sin = self.cos[pos].to(dtype), self.sin[pos].to(dtype)
        return cos.unsqueeze(-3), sin.unsqueeze(-3)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
