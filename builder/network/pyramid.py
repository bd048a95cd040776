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


def query_and_keys(layer, rope: tuple[torch.Tensor, torch.Tensor], h: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer's RoPE'd query of the last token of h (1, L, dim) and keys of all L tokens:
    (H, hd) and (L, KV, hd)."""
    attn = layer.attention
    cfg = attn.cfg
    x = layer.attention_norm(h)
    w = attn.wqkv.weight
    q = x[:, -1:] @ w[:cfg.q_size].T  # only the last token's query is needed
    k = x @ w[cfg.q_size:cfg.q_size + cfg.kv_size].T
    cos, sin = rope
    q = apply_rope(attn.split_heads(q, cfg.n_heads), cos[..., -1:, :], sin[..., -1:, :])  # (1, H, 1, hd)
    k = apply_rope(attn.split_heads(k, cfg.n_kv_heads), cos, sin)  # (1, KV, L, hd)
    return q[0, :, 0], k[0].transpose(0, 1)


def attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Head-averaged fp32 softmax attention of q (H, hd) over the keys k (L, KV, hd) -> (L,)."""
    heads, head_dim = q.shape
    k = k.repeat_interleave(heads // k.shape[1], dim=1)  # GQA: (L, H, hd)
    logits = torch.einsum("hd,lhd->hl", q.float(), k.float()) / head_dim ** 0.5
    return logits.softmax(dim=-1).mean(dim=0)


def select(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices of the `n_keep` highest scores, ties to the lower index, in ascending order."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:n_keep].sort().values


def rank(layer, rope: tuple[torch.Tensor, torch.Tensor], h: torch.Tensor, start: int, n: int, n_keep: int
         ) -> torch.Tensor:
    """The rule: the `n_keep` image tokens of the span [start, start + n) of h (1, L, dim) that the
    last token of h attends to most, as ascending indices into the span."""
    q, k = query_and_keys(layer, rope, h)
    return select(attention(q, k)[start:start + n], n_keep)


def keep_rows(length: int, start: int, n: int, kept: torch.Tensor) -> torch.Tensor:
    """Row indices of a sequence of `length` after its image span [start, start + n) keeps `kept`."""
    seq = torch.arange(length, device=kept.device)
    return torch.cat((seq[:start], kept + start, seq[start + n:]))


def positions_after(span: ImageSpan, n_prompt: int, mode: str) -> torch.Tensor:
    """RoPE positions of the surviving tokens: renumbered 0..L'-1 (the authors' rule) or, for the
    FastV-style baseline, their original positions."""
    length = n_prompt - span.n_original + span.n_alive
    device = span.original.device
    if mode == "renumber":
        return torch.arange(length, device=device)
    return torch.cat((torch.arange(span.start, device=device), span.start + span.original,
                      torch.arange(span.start + span.n_original, n_prompt, device=device)))


def drop(layer, rope, h: torch.Tensor, span: ImageSpan, n_keep: int, layer_index: int, kernels=None,
         method: str = "attention", seed: int = 0) -> tuple[torch.Tensor, ImageSpan, StageStats]:
    """Rank the alive image tokens of h (1, L, dim) and compact h to the `n_keep` best of them, with
    the CUDA kernels when given (runtime/kernels.py), else with torch ops. method "random" keeps a
    random subset instead (a baseline), seeded by (seed, layer)."""
    n, length = span.n_alive, h.shape[1]
    n_keep = min(n_keep, n)
    if method == "random":
        g = torch.Generator().manual_seed(seed * 1000 + layer_index)
        kept = torch.randperm(n, generator=g)[:n_keep].sort().values.to(h.device)
        h = h[:, keep_rows(length, span.start, n, kept)]
    elif kernels is None:
        kept = rank(layer, rope, h, span.start, n, n_keep)
        h = h[:, keep_rows(length, span.start, n, kept)]
    else:
        q, k = query_and_keys(layer, rope, h)
        scores = kernels.score(q[None], k, [length], [span.start], [n])
        kept32 = kernels.select(scores, [n], [n_keep])
        h = kernels.compact(h[0], [length], [span.start], [n], kept32, [n_keep])[None]
        kept = kept32.long()
    new_span = ImageSpan(span.start, span.n_original, span.original[kept])
    return h, new_span, StageStats(layer_index, n, n_keep, new_span.original.tolist())
