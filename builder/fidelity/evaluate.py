"""Test-set accuracy of a built engine under PyramidDrop and its baselines, at matched budgets.

Every variant runs through the engine (prepare + prefill + first token): answers are one token.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..format.config import PyramidSchedule
from ..network.flops import full_flops, paper_flops
from ..runtime.engine import Engine, Request
from ..runtime.sampling import SamplingParams
from .task import Example, render
from .train import IMAGE, PROMPT


@dataclass
class Variant:
    name: str
    family: str  # "none", "pdrop", "random", "fastv", "pdrop-small", "positions"
    schedule: PyramidSchedule


def prepare(engine: Engine, examples: list[Example]) -> list[Request]:
    """Each test question prepared once (tokens, image tiles); variants only swap the schedule."""
    return [engine.prepare(PROMPT.format(question=ex.question), render(ex.items, IMAGE),
                           SamplingParams(max_new_tokens=1)) for ex in examples]


def correct(engine: Engine, prepared: list[Request], examples: list[Example], schedule: PyramidSchedule,
            batch: int = 32) -> np.ndarray:
    """(questions,) whether each question is answered right under `schedule`."""
    right = np.zeros(len(examples), dtype=bool)
    for i in range(0, len(examples), batch):
        reqs = [replace(r, schedule=schedule) for r in prepared[i:i + batch]]
        for delta in engine.stream_prepared(reqs):
            if delta.result is not None:
                ex = examples[i + delta.index]
                right[i + delta.index] = delta.token_id == engine.tokenizer.convert_tokens_to_ids(ex.answer)
    return right


def _bisect(f, lo: float, hi: float, target: float, steps: int = 60) -> float:
    """x in [lo, hi] with f(x) closest to target, f increasing."""
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return (lo + hi) / 2


def variants(n_layers: int, n_image: int, cfg) -> list[Variant]:
    """No drop; PyramidDrop at 0.25/0.5/0.75; random keep at the same budgets; FastV-style one-shot
    at layer 2 with original positions and PyramidDrop 0.5's FLOPs; PyramidDrop with renumbering
    vs original positions; PyramidDrop at the paper's small budgets (average image tokens per layer
    1/3, 2/9, 1/9 of N) with boundaries moved earlier (the paper's 2,8,16 of 32 layers, scaled)."""
    def create(drop: float, layers: list[int] | None = None, **kw) -> PyramidSchedule:
        return PyramidSchedule.create(n_layers, drop, layers, **kw)

    out = [Variant("no drop", "none", create(0.0))]
    for r in (0.25, 0.5, 0.75):
        out.append(Variant(f"PyramidDrop {r}", "pdrop", create(r)))
        out.append(Variant(f"random {r}", "random", create(r, method="random")))
    target = paper_flops(cfg, create(0.5), n_image)
    fastv_layer = min(2, n_layers - 1)
    keep = _bisect(lambda k: paper_flops(cfg, create(1 - k, layers=[fastv_layer]), n_image), 0.0, 0.999, target)
    out.append(Variant(f"FastV K={fastv_layer} keep {keep:.2f}", "fastv",
                       create(round(1 - keep, 4), layers=[fastv_layer], positions="original")))
    out.append(Variant("PyramidDrop 0.5, original positions", "positions", create(0.5, positions="original")))
    early = sorted({max(1, round(n_layers * f)) for f in (2 / 32, 8 / 32, 16 / 32)})
    for frac, label in ((1 / 3, "1/3"), (2 / 9, "2/9"), (1 / 9, "1/9")):
        def mean_tokens(keep_ratio: float) -> float:
            sched = PyramidSchedule(early, round(1 - keep_ratio, 6))
            return sum(sched.tokens_per_layer(n_image, n_layers)) / n_layers
        lam = _bisect(mean_tokens, 0.01, 0.99, frac * n_image)
        out.append(Variant(f"PyramidDrop avg {label} N (layers {early}, keep {lam:.2f})", "pdrop-small",
                           create(round(1 - lam, 4), layers=early)))
    return out


def flops_of(cfg, schedule: PyramidSchedule, n_image: int, n_text: int) -> dict:
    return {"paper": paper_flops(cfg, schedule, n_image), "full": full_flops(cfg, schedule, n_image, n_text),
            "avg_image_tokens": sum(schedule.tokens_per_layer(n_image, cfg.n_layers)) / cfg.n_layers}
