"""Prefill FLOPs with and without PyramidDrop.

`paper`: the authors' formula (Section 3.1, issues #11/#20), per layer 4nd^2 + 2n^2d + 3ndm over the
image tokens n of that layer only; it gives 20.83 -> 9.46 T at N = 2,880 on a 7B (the "-55%").
`full`: every prompt token, GQA-sized projections, attention as n^2 per layer, times 2 for
multiply-add, plus the LM head on the last token: what the hardware actually executes (roughly).
"""
from __future__ import annotations

from ..format.config import LLMConfig, PyramidSchedule


def paper_flops(cfg: LLMConfig, schedule: PyramidSchedule | None, n_image: int) -> float:
    counts = (schedule.tokens_per_layer(n_image, cfg.n_layers) if schedule else [n_image] * cfg.n_layers)
    d, m = cfg.dim, cfg.intermediate_size
    return float(sum(4 * n * d * d + 2 * n * n * d + 3 * n * d * m for n in counts))


def full_flops(cfg: LLMConfig, schedule: PyramidSchedule | None, n_image: int, n_text: int) -> float:
    counts = (schedule.tokens_per_layer(n_image, cfg.n_layers) if schedule else [n_image] * cfg.n_layers)
    d = cfg.dim
    per_token = d * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * d + 3 * d * cfg.intermediate_size
    total = 0
    for n_img in counts:
        n = n_img + n_text
        total += n * per_token + 2 * n * n * cfg.head_dim * cfg.n_heads
    return 2.0 * (total + d * cfg.vocab_size)


def report(cfg: LLMConfig, schedule: PyramidSchedule, n_image: int, n_text: int) -> dict:
    base_paper, drop_paper = paper_flops(cfg, None, n_image), paper_flops(cfg, schedule, n_image)
    base_full, drop_full = full_flops(cfg, None, n_image, n_text), full_flops(cfg, schedule, n_image, n_text)
    return {
        "paper": {"no_drop": base_paper, "drop": drop_paper, "ratio": drop_paper / base_paper if base_paper else 1.0},
        "full": {"no_drop": base_full, "drop": drop_full, "ratio": drop_full / base_full},
    }
