"""PyramidDrop's rank-and-keep rule, in one place (arXiv 2410.17247, the authors' `pdrop_forward`).

Before boundary layer b runs, the alive image tokens are scored by the attention the last prompt
token gives them, computed with layer b's own input norm, q/k projections and RoPE at the current
positions: softmax over all keys in fp32, mean over heads (K heads repeated for GQA). The top k
survive, ties to the lower index, kept in their original order; the sequence is compacted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .rope import apply_rope


@dataclass
class ImageSpan:
    start: int  # index of the first image token in the current (compacted) sequence
    n_original: int  # N, the image tokens before any drop: keep counts are fractions of it
    original: torch.Tensor  # (n_alive,) indices of the alive tokens in the original image-token order

    @property
    def n_alive(self) -> int:
        return self.original.numel()

    @classmethod
    def full(cls, start: int, n: int, device) -> "ImageSpan":
        return cls(start, n, torch.arange(n, device=device))


@dataclass
class StageStats:
    layer: int
    tokens_in: int
    tokens_kept: int
    kept: list[int]  # indices of kept image tokens in the original image-token order

    def to_dict(self) -> dict:
        return {"layer": self.layer, "tokens_in": self.tokens_in, "tokens_kept": self.tokens_kept,
                "kept": self.kept}


def last_token_attention(layer, rope: tuple[torch.Tensor, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """Head-averaged fp32 attention of the last token of h (1, L, dim) over all L keys -> (L,)."""
    attn = layer.attention
    cfg = attn.cfg
    x = layer.attention_norm(h)
    w = attn.wqkv.weight
    q = x[:, -1:] @ w[:cfg.q_size].T  # only the last token's query is needed
    k = x @ w[cfg.q_size:cfg.q_size + cfg.kv_size].T
    cos, sin = rope
    q = apply_rope(attn.split_heads(q, cfg.n_heads), cos[..., -1:, :], sin[..., -1:, :])  # (1, H, 1, hd)
    k = apply_rope(attn.split_heads(k, cfg.n_kv_heads), cos, sin)  # (1, KV, L, hd)
    k = k.repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=1)  # (1, H, L, hd)
    logits = (q.float() @ k.float().transpose(-1, -2)) / cfg.head_dim ** 0.5  # (1, H, 1, L)
    return logits.softmax(dim=-1).mean(dim=1)[0, 0]


def select(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, ties to the lower index, in ascending order."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:keep].sort().values


def drop(layer, rope, h: torch.Tensor, span: ImageSpan, keep: int, layer_index: int
         ) -> tuple[torch.Tensor, ImageSpan, StageStats]:
    """Score the alive image tokens of h (1, L, dim) and compact h to the `keep` best of them."""
    n = span.n_alive
    scores = last_token_attention(layer, rope, h)[span.start:span.start + n]
    kept = select(scores, min(keep, n))
    seq = torch.arange(h.shape[1], device=h.device)
    rows = torch.cat((seq[:span.start], kept + span.start, seq[span.start + n:]))
    new_span = ImageSpan(span.start, span.n_original, span.original[kept])
    stats = StageStats(layer_index, n, kept.numel(), new_span.original.tolist())
    return h[:, rows], new_span, stats
