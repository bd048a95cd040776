"""Bootstrap intervals over seeds and questions: their width, their pairing, and when they separate."""
from __future__ import annotations

import numpy as np

from builder.fidelity import intervals


def test_interval_holds_the_mean_and_has_the_binomial_width():
    rng = np.random.default_rng(0)
    right = rng.random((3, 2000)) < 0.7
    e = intervals.mean(right)
    assert e.low < e.mean < e.high and abs(e.mean - right.mean()) < 1e-12
    # 6,000 answers at p = 0.7: the binomial 95% half-width is 1.96 * sqrt(0.21 / 6000) = 1.2 points
    assert 0.008 < (e.high - e.low) / 2 < 0.016


def test_seed_to_seed_spread_widens_the_interval():
    rng = np.random.default_rng(1)
    same = rng.random((3, 2000)) < 0.7
    spread = np.stack([rng.random(2000) < p for p in (0.6, 0.7, 0.8)])
    narrow, wide = intervals.mean(same), intervals.mean(spread)
    assert wide.high - wide.low > 2 * (narrow.high - narrow.low)


def test_paired_differences_cancel_shared_noise_and_separate_real_gaps():
    rng = np.random.default_rng(2)
    a = rng.random((3, 2000)) < 0.7
    b = a.copy()
    for seed in range(3):  # b answers 30 more questions right on every seed: +1.5 points
        b[seed, np.flatnonzero(~b[seed])[:30]] = True
    same = intervals.difference(a, a)
    assert same.mean == same.low == same.high == 0.0
    gap = intervals.difference(b, a)
    assert gap.mean > 0 and gap.separates_from(0)
    # unpaired, the same gap is inside the noise of either figure
    assert intervals.mean(a).high > intervals.mean(b).low
    r = intervals.ratio(b, a)
    assert r.low > 1.0 and abs(r.mean - b.mean() / a.mean()) < 1e-12


def test_format_shows_mean_and_interval():
    assert intervals.Estimate(0.9123, 0.9, 0.92).format() == "91.2 (90.0–92.0)"
    assert intervals.Estimate(0.98765, 0.97, 1.0).format(1, 3) == "0.988 (0.970–1.000)"
