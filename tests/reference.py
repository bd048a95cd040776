"""A plain reference of PyramidDrop, written apart from the engine, as the oracle of its fast path.

It recomputes the whole sequence from scratch (no KV cache), from the checkpoint's own unfused
tensors, with hand-written attention: at each boundary it scores the image span by the attention
of the last PROMPT token (causal, so tokens generated after it change nothing), keeps the top
authors_count(N, keep, s) (ties to the lower index) in original order, compacts, renumbers positions.
"""
from __future__ import annotations

from decimal import Decimal

import torch


def authors_count(n_image: int, keep: float, stage: int) -> int:
    """Image tokens kept after boundary `stage` as the authors' code counts them: int(N * ratio), the
    ratio keep**(stage+1) written out as a decimal literal in their scripts (0.5, 0.25, 0.125)."""
    return int(n_image * float(Decimal(repr(keep)) ** (stage + 1)))


class Reference:
    def __init__(self, ckpt):
        self.t = {n: ckpt.load(n).float() for n in ckpt.names if n.startswith(("language_model.", "lm_head"))}
        c = ckpt.hf_config.text_config
        self.n_layers, self.n_heads, self.n_kv = c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads
        self.head_dim = c.head_dim
        self.eps = c.rms_norm_eps
        self.theta = c.rope_parameters["rope_theta"]

    def w(self, i: int, name: str) -> torch.Tensor:
        return self.t[f"language_model.layers.{i}.{name}.weight"]

    def norm(self, x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def rope(self, x, pos):  # x: (heads, n, hd) at positions pos (n,)
        inv = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        ang = pos.float()[:, None] * inv[None]
        cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
        half = self.head_dim // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin

    def qkv(self, i, h, pos):
        n = h.shape[0]
        x = self.norm(h, self.w(i, "input_layernorm"))
        q = (x @ self.w(i, "self_attn.q_proj").T).view(n, self.n_heads, -1).transpose(0, 1)
        k = (x @ self.w(i, "self_attn.k_proj").T).view(n, self.n_kv, -1).transpose(0, 1)
        v = (x @ self.w(i, "self_attn.v_proj").T).view(n, self.n_kv, -1).transpose(0, 1)
        rep = self.n_heads // self.n_kv
        return self.rope(q, pos), self.rope(k, pos).repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)

    def attention_probs(self, q, k):  # (H, n, n) causal softmax
        n = q.shape[1]
        logits = q @ k.transpose(-1, -2) / self.head_dim ** 0.5
        return logits.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf")).softmax(-1)

    def layer(self, i, h, pos):
        q, k, v = self.qkv(i, h, pos)
        y = (self.attention_probs(q, k) @ v).transpose(0, 1).reshape(h.shape[0], -1)
        h = h + y @ self.w(i, "self_attn.o_proj").T
        x = self.norm(h, self.w(i, "post_attention_layernorm"))
        gate, up = x @ self.w(i, "mlp.gate_proj").T, x @ self.w(i, "mlp.up_proj").T
        return h + (torch.nn.functional.silu(gate) * up) @ self.w(i, "mlp.down_proj").T

    def forward(self, embeds, prompt_len, image_start, n_image, layers, keep, positions="renumber",
                method="attention", seed=0):
        """embeds: (L, dim) = prompt (+ generated tokens). Returns last-position logits and kept indices.
        positions "original" and method "random" are the baselines (FastV-style positions, random keep)."""
        h = embeds.float()
        pos = torch.arange(h.shape[0])
        alive = torch.arange(n_image)
        kept_per_stage = []
        for i in range(self.n_layers):
            if n_image and keep < 1.0 and i in layers:
                n_alive = alive.numel()
                count = authors_count(n_image, keep, layers.index(i))
                if method == "random":
                    g = torch.Generator().manual_seed(seed * 1000 + i)
                    chosen = torch.randperm(n_alive, generator=g)[:count].sort().values
                else:
                    query = prompt_len - (n_image - n_alive) - 1  # last prompt token, after earlier drops
                    q, k, _ = self.qkv(i, h, pos)
                    scores = self.attention_probs(q, k)[:, query].mean(0)[image_start:image_start + n_alive]
                    # stable descending sort = ties go to the lower index
                    chosen = torch.sort(scores, descending=True, stable=True).indices[:count].sort().values
                alive = alive[chosen]
                kept_per_stage.append(alive.tolist())
                rows = torch.cat((torch.arange(image_start), image_start + chosen,
                                  torch.arange(image_start + n_alive, h.shape[0])))
                h = h[rows]
                pos = pos[rows] if positions == "original" else torch.arange(h.shape[0])
            h = self.layer(i, h, pos)
        logits = self.norm(h[-1], self.t["language_model.norm.weight"]) @ self.t["lm_head.weight"].T
        return logits, kept_per_stage


def paged_decode_reference(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                           num_keys: torch.Tensor) -> torch.Tensor:
    """Decode attention over paged keys, row by row, in fp32: row b's keys are its first num_keys[b]
    tokens of blocks tables[b] ((blocks, block_size, kv, dim) pools); a row with none gets zeros."""
    heads, kv = q.shape[1], k_pool.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float32)
    for b, n in enumerate(num_keys.tolist()):
        if n:
            k, v = (pool[tables[b].cpu()].flatten(0, 1)[:n].float().cpu().repeat_interleave(heads // kv, 1)
                    for pool in (k_pool, v_pool))  # (n, heads, dim)
            scores = torch.einsum("hd,nhd->hn", q[b].float().cpu(), k) * q.shape[-1] ** -0.5
            out[b] = torch.einsum("hn,nhd->hd", scores.softmax(-1), v)
    return out


def random_paged_batch(gen: torch.Generator, batch: int, heads: int, kv: int, dim: int, block_size: int,
                       dtype: torch.dtype, max_keys: int = 1200):
    """q, pools, tables (scattered block ids, as wide as the longest row plus slack) and ragged
    num_keys, one row empty."""
    num_keys = torch.randint(1, max_keys, (batch,), generator=gen)
    num_keys[batch // 2] = 0  # a padding row
    width = int(num_keys.max()) // block_size + 3
    n_blocks = batch * width + 1
    k_pool, v_pool = (torch.randn(n_blocks, block_size, kv, dim, generator=gen).to(dtype) for _ in range(2))
    tables = torch.randperm(n_blocks - 1, generator=gen)[:batch * width].view(batch, width) + 1
    q = torch.randn(batch, heads, dim, generator=gen).to(dtype)
    return q, k_pool, v_pool, tables, num_keys
