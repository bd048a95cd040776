"""Per-request sampling parameters and next-token selection (greedy, temperature, top-k, top-p)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import InputError


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InputError(f"stop strings must be non-empty strings, got {self.stop!r}")


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (vocab,) logits outside the top-k and outside the smallest set of mass >= top_p."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p; the first token always stays
        remove = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(remove.scatter(0, order, remove), -math.inf)
    return logits


class Sampler:
    """One per request: holds its parameters and its own seeded generator."""

    def __init__(self, params: SamplingParams, device: torch.device):
        self.params = params
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """(vocab,) logits -> 0-d token id tensor."""
        if self.generator is None:
            return logits.argmax()
        p = self.params
        probs = filter_logits(logits.float() / p.temperature, p.top_k, p.top_p).softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator)[0]
