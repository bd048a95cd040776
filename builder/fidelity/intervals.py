"""95% intervals by bootstrap over training seeds and test items, the way the report states every figure.

A figure is the mean of a (seeds, items) matrix: 0/1 answers of each trained model to each test
question, or the step times of each training run. Each draw resamples seeds and items with
replacement and takes the mean. Draws depend only on the matrix's shape, so two figures over the
same seeds and questions share their draws: a difference or ratio of two figures is computed draw
by draw (paired), which is what decides whether two methods separate.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DRAWS = 2000


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float
    high: float

    def separates_from(self, value: float) -> bool:
        return not self.low <= value <= self.high

    def format(self, scale: float = 100.0, digits: int = 1) -> str:
        return f"{scale * self.mean:.{digits}f} ({scale * self.low:.{digits}f}–{scale * self.high:.{digits}f})"

    def as_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high}


def draws(values: np.ndarray, n: int = DRAWS) -> np.ndarray:
    """(n,) bootstrap means of `values` (seeds, items), seeds and items resampled together."""
    values = np.asarray(values, dtype=np.float64)
    seeds, items = values.shape
    rng = np.random.default_rng(seeds * 1_000_003 + items)  # same shape -> same draws (paired)
    seed_idx = rng.integers(0, seeds, (n, seeds))
    item_idx = rng.integers(0, items, (n, items))
    per_seed = np.stack([values[:, idx].mean(axis=1) for idx in item_idx])  # (n, seeds)
    return np.take_along_axis(per_seed, seed_idx, axis=1).mean(axis=1)


def estimate(point: float, samples: np.ndarray) -> Estimate:
    low, high = np.percentile(samples, [2.5, 97.5])
    return Estimate(float(point), float(low), float(high))


def mean(values: np.ndarray) -> Estimate:
    return estimate(float(np.mean(values)), draws(values))


def ratio(a: np.ndarray, b: np.ndarray) -> Estimate:
    """mean(a) / mean(b), paired draws."""
    da, db = draws(a), draws(b)
    return estimate(float(np.mean(a) / np.mean(b)), da / np.maximum(db, 1e-12))


def difference(a: np.ndarray, b: np.ndarray) -> Estimate:
    """mean(a) - mean(b), paired draws."""
    return estimate(float(np.mean(a) - np.mean(b)), draws(a) - draws(b))
