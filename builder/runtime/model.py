"""The language model: a Llama-family decoder in plain PyTorch, with PyramidDrop inside prefill.

Weights are laid out as the builder converts them: fused `wqkv` and `w13` (gate, up) projections.
Prefill runs one sequence at a time (each has its own image span and drop schedule) and fills its
row of the static KV cache; decode runs the whole batch, each row at its own per-layer length.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..format.config import LLMConfig, PyramidSchedule
from . import pyramid
from .kv_cache import LayerKV, NoCache
from .rope import Rope, apply_rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and scale after casting back, as Llama's reference does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.wqkv = nn.Linear(cfg.dim, cfg.q_size + 2 * cfg.kv_size, bias=False)
        self.wo = nn.Linear(cfg.q_size, cfg.dim, bias=False)
        self.kv_cache: LayerKV | NoCache = NoCache()

    def split_heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, n_heads, self.cfg.head_dim).transpose(1, 2)  # (B, H, T, hd)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], row: int | None) -> torch.Tensor:
        """Prefill of cache row `row` (x: (1, L, dim)) or, with row None, one decode step (x: (B, 1, dim))."""
        cfg = self.cfg
        q, k, v = self.wqkv(x).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = apply_rope(self.split_heads(q, cfg.n_heads), *rope)
        k = apply_rope(self.split_heads(k, cfg.n_kv_heads), *rope)
        k, v, mask = self.kv_cache.update(k, self.split_heads(v, cfg.n_kv_heads), row)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        b, _, t, _ = y.shape
        return self.wo(y.transpose(1, 2).reshape(b, t, cfg.q_size))


class FeedForward(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], row: int | None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, row)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: LLMConfig, max_seq_len: int):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.rope = Rope(cfg.head_dim, cfg.rope_theta, max_seq_len)
        self.kernels = None  # runtime.kernels.Kernels on CUDA when the engine ships them

    def setup_caches(self, batch: int, max_len: int) -> None:
        p = self.output.weight
        for layer in self.layers:
            layer.attention.kv_cache = LayerKV(batch, self.cfg.n_kv_heads, max_len, self.cfg.head_dim,
                                               p.dtype, p.device)

    def prefill(self, embeds: torch.Tensor, row: int, span: pyramid.ImageSpan | None,
                schedule: PyramidSchedule) -> tuple[torch.Tensor, list[pyramid.StageStats]]:
        """Run one prompt (embeds: (1, L, dim)) through every layer, dropping image tokens at each
        stage boundary, and fill cache row `row`. Returns the final-normed hidden states of the
        surviving tokens and the per-boundary stats."""
        h = embeds
        n_prompt = embeds.shape[1]
        pos = torch.arange(n_prompt, device=h.device)
        stages = []
        for i, layer in enumerate(self.layers):
            if span is not None and i in schedule.layers:
                if schedule.active:
                    n_keep = schedule.kept_after(span.n_original, schedule.layers.index(i))
                    h, span, stats = pyramid.drop(layer, self.rope(pos, h.dtype), h, span, n_keep, i, self.kernels,
                                                  schedule.method, schedule.seed)
                    pos = pyramid.positions_after(span, n_prompt, schedule.positions)
                else:
                    stats = pyramid.StageStats(i, span.n_alive, span.n_alive, span.original.tolist())
                stages.append(stats)
            h = layer(h, self.rope(pos, h.dtype), row)
            cache = layer.attention.kv_cache
            cache.offsets[row] = n_prompt - h.shape[1] if schedule.positions == "original" else 0
        return self.norm(h), stages

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One step for the whole batch: tokens (B,) -> logits (B, vocab)."""
        h = self.tok_embeddings(tokens)[:, None]  # (B, 1, dim)
        for layer in self.layers:
            pos = layer.attention.kv_cache.positions()  # (B, 1): this layer's own length (+ offset)
            h = layer(h, self.rope(pos, h.dtype), None)
        return self.output(self.norm(h))[:, 0]
