"""The language model: a Llama-family decoder in plain PyTorch, with PyramidDrop inside prefill.

Weights are laid out as the builder converts them: fused `wqkv` and `w13` (gate, up) projections.
Prefill runs one sequence at a time (each has its own image span and drop schedule), a pyramid
stage per call, and writes its blocks of the paged KV cache; decode runs a batch of sequences, each
at its own per-layer length.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..format.config import LLMConfig, PyramidSchedule
from . import pyramid
from .attention import NoCache, PagedLayerKV
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
        self.kv_cache: PagedLayerKV | NoCache = NoCache()

    def split_heads(self, x: torch.Tensor, n_heads: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, n_heads, self.cfg.head_dim).transpose(1, 2)  # (B, H, T, hd)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], row: int | None) -> torch.Tensor:
        """Prefill of cache row `row` (x: (1, L, dim)) or, with row None, one decode step (x: (B, 1, dim))."""
        cfg = self.cfg
        q, k, v = self.wqkv(x).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = apply_rope(self.split_heads(q, cfg.n_heads), *rope)
        k = apply_rope(self.split_heads(k, cfg.n_kv_heads), *rope)
        y = self.kv_cache.attend(q, k, self.split_heads(v, cfg.n_kv_heads), row)
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
        self.kernels = None  # network.kernels.Kernels on CUDA when the engine ships them
        self.decode_kernels = None  # the paged decode attention: Kernels on CUDA, CpuKernels on the CPU

    def attach(self, pool: BlockPool) -> None:
        """Every layer's attention reads and writes its keys and values through `pool` (the runtime's
        paged_kv.BlockPool)."""
        for i, layer in enumerate(self.layers):
            layer.attention.kv_cache = PagedLayerKV(pool, i, self.decode_kernels)

    def start_prefill(self, embeds: torch.Tensor, seq: SequenceKV, span: pyramid.ImageSpan | None,
                      schedule: PyramidSchedule, cached: int = 0, cached_hidden: torch.Tensor | None = None
                      ) -> Prefill:
        """A prefill of the prompt whose tokens from `cached` on are `embeds`: the first `cached`
        are a prefix-cache hit, in seq's first blocks up to a depth, and their hidden states at the
        first boundary are `cached_hidden` (None when the blocks span every layer)."""
        n = cached + embeds.shape[1]
        return Prefill(embeds, span, torch.arange(cached, n, device=embeds.device), n, schedule, seq,
                       stage_ends(schedule, self.cfg.n_layers), cached_hidden=cached_hidden)

    def prefill_stage(self, p: Prefill) -> None:
        """Run `p` through the layers of its next stage, dropping image tokens at the boundary that
        opens it; the layers write the surviving tokens' keys and values to p.seq's blocks."""
        schedule, h, pos = p.schedule, p.h, p.pos
        end = p.ends.pop(0)
        for i in range(p.layer, end):
            layer = self.layers[i]
            if p.span is not None and i in schedule.layers:
                if schedule.active:
                    n_keep = schedule.kept_after(p.span.n_original, schedule.layers.index(i))
                    h, p.span, stats = pyramid.drop(layer, self.rope(pos, h.dtype), h, p.span, n_keep, i,
                                                    self.kernels, schedule.method, schedule.seed)
                    pos = pyramid.positions_after(p.span, p.n_prompt, schedule.positions)
                else:
                    stats = pyramid.StageStats(i, p.span.n_alive, p.span.n_alive, p.span.original.tolist())
                p.stages.append(stats)
            h = layer(h, self.rope(pos, h.dtype), p.seq)
            p.seq.offsets[i] = p.n_prompt - p.seq.lengths[i] if schedule.positions == "original" else 0
        if p.cached_hidden is not None:  # a prefix-cache hit joins the prefix at the first boundary
            h, pos = torch.cat((p.cached_hidden, h), dim=1), torch.arange(p.n_prompt, device=h.device)
            p.cached_hidden = None
        p.h, p.pos, p.layer = h, pos, end

    def prefill(self, embeds: torch.Tensor, seq: SequenceKV, span: pyramid.ImageSpan | None,
                schedule: PyramidSchedule) -> tuple[torch.Tensor, list[pyramid.StageStats]]:
        """Run one prompt (embeds: (1, L, dim)) through every stage at once. Returns the final-normed
        hidden states of the surviving tokens and the per-boundary stats."""
        p = self.start_prefill(embeds, seq, span, schedule)
        while not p.done:
            self.prefill_stage(p)
        return self.norm(p.h), p.stages

    def decode(self, tokens: torch.Tensor, batch: DecodeBatch) -> torch.Tensor:
        """One step for a batch of sequences: tokens (B,) -> logits (B, vocab)."""
        h = self.tok_embeddings(tokens)[:, None]  # (B, 1, dim)
        for layer in self.layers:
            cache = layer.attention.kv_cache
            cache.batch = batch
            h = layer(h, self.rope(cache.positions(), h.dtype), None)  # each row at this layer's own length
        return self.output(self.norm(h))[:, 0]


def stage_ends(schedule: PyramidSchedule, n_layers: int) -> list[int]:
    """The layer each prefill chunk ends before: the stage boundaries, then the depth."""
    return [*schedule.layers, n_layers]


@dataclass
class Prefill:
    """A prompt on its way through the layers, one stage at a time."""
    h: torch.Tensor  # (1, L', dim) hidden states after `layer` layers
    span: pyramid.ImageSpan | None
    pos: torch.Tensor  # (L',) RoPE positions
    n_prompt: int
    schedule: PyramidSchedule
    seq: SequenceKV
    ends: list[int]  # the layer each stage still to run ends before
    layer: int = 0  # the next layer to run
    stages: list[pyramid.StageStats] = field(default_factory=list)
    cached_hidden: torch.Tensor | None = None  # a prefix-cache hit's, joined after the first stage

    @property
    def done(self) -> bool:
        return not self.ends
