"""A plain reference of PyramidDrop, written apart from the engine, as the oracle of its fast path.

It recomputes the whole sequence from scratch (no KV cache), from the checkpoint's own unfused
tensors, with hand-written attention: at each boundary it scores the image span by the attention
of the last PROMPT token (causal, so tokens generated after it change nothing), keeps the top
floor(N * keep**(s+1)) (ties to the lower index) in original order, compacts, renumbers positions.
"""
from __future__ import annotations

import torch


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

    def rope(self, x, n):  # x: (heads, n, hd), positions 0..n-1
        inv = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        ang = torch.arange(n).float()[:, None] * inv[None]
        cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()
        half = self.head_dim // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin

    def qkv(self, i, h):
        n = h.shape[0]
        x = self.norm(h, self.w(i, "input_layernorm"))
        q = (x @ self.w(i, "self_attn.q_proj").T).view(n, self.n_heads, -1).transpose(0, 1)
        k = (x @ self.w(i, "self_attn.k_proj").T).view(n, self.n_kv, -1).transpose(0, 1)
        v = (x @ self.w(i, "self_attn.v_proj").T).view(n, self.n_kv, -1).transpose(0, 1)
        rep = self.n_heads // self.n_kv
        return self.rope(q, n), self.rope(k, n).repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)

    def attention_probs(self, q, k):  # (H, n, n) causal softmax
        n = q.shape[1]
        logits = q @ k.transpose(-1, -2) / self.head_dim ** 0.5
        return logits.masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf")).softmax(-1)

    def layer(self, i, h):
        q, k, v = self.qkv(i, h)
        y = (self.attention_probs(q, k) @ v).transpose(0, 1).reshape(h.shape[0], -1)
        h = h + y @ self.w(i, "self_attn.o_proj").T
        x = self.norm(h, self.w(i, "post_attention_layernorm"))
        gate, up = x @ self.w(i, "mlp.gate_proj").T, x @ self.w(i, "mlp.up_proj").T
        return h + (torch.nn.functional.silu(gate) * up) @ self.w(i, "mlp.down_proj").T

    def forward(self, embeds, prompt_len, image_start, n_image, layers, keep):
        """embeds: (L, dim) = prompt (+ generated tokens). Returns last-position logits and kept indices."""
        h = embeds.float()
        alive = torch.arange(n_image)
        kept_per_stage = []
        for i in range(self.n_layers):
            if n_image and keep < 1.0 and i in layers:
                query = prompt_len - (n_image - alive.numel()) - 1  # last prompt token, after earlier drops
                q, k, _ = self.qkv(i, h)
                scores = self.attention_probs(q, k)[:, query].mean(0)[image_start:image_start + alive.numel()]
                count = int(n_image * keep ** (layers.index(i) + 1))
                # stable descending sort = ties go to the lower index
                chosen = torch.sort(scores, descending=True, stable=True).indices[:count].sort().values
                alive = alive[chosen]
                kept_per_stage.append(alive.tolist())
                rows = torch.cat((torch.arange(image_start), image_start + chosen,
                                  torch.arange(image_start + scores.numel(), h.shape[0])))
                h = h[rows]
            h = self.layer(i, h)
        logits = self.norm(h[-1], self.t["language_model.norm.weight"]) @ self.t["lm_head.weight"].T
        return logits, kept_per_stage
