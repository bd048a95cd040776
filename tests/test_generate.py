"""Generation API: streaming, sampling, stop words, EOS, length limits."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from builder.format.errors import InputError
from builder.runtime.sampling import SamplingParams, filter_logits

PROMPT = "USER: <image>\nWhat is here? ASSISTANT:"


def test_stream_deltas_add_up_to_the_result(engine, images):
    deltas = list(engine.stream([PROMPT, PROMPT], [images[0], images[1]], max_new_tokens=10))
    for i in range(2):
        mine = [d for d in deltas if d.index == i]
        assert [d.token_id for d in mine] == mine[-1].result.token_ids
        assert "".join(d.text for d in mine) == mine[-1].result.text
        assert all(d.result is None for d in mine[:-1])


def test_seeded_sampling_is_reproducible_and_seed_dependent(engine, images):
    kw = dict(max_new_tokens=16, temperature=1.0)
    a = engine.generate([PROMPT], [images[0]], seed=7, **kw)[0].token_ids
    b = engine.generate([PROMPT], [images[0]], seed=7, **kw)[0].token_ids
    c = engine.generate([PROMPT], [images[0]], seed=8, **kw)[0].token_ids
    assert a == b and a != c


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6)])
def test_degenerate_sampling_equals_greedy(engine, images, kw):
    greedy = engine.generate([PROMPT], [images[0]], max_new_tokens=8)[0].token_ids
    sampled = engine.generate([PROMPT], [images[0]], max_new_tokens=8, temperature=0.8, seed=1, **kw)[0].token_ids
    assert sampled == greedy


def test_filter_logits_top_k_and_top_p():
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [True, False, False, True]
    probs = logits.softmax(-1)  # sorted masses: 0.644, 0.237, 0.087, 0.032
    assert probs[1] < 0.7 < probs[1] + probs[2]
    kept = ~torch.isinf(filter_logits(logits, 0, 0.7))
    assert kept.tolist() == [False, True, True, False]


def test_stop_string_truncates(engine, images):
    base = engine.generate([PROMPT], [images[0]], max_new_tokens=12)[0]
    stop = next(t for t in (engine.tokenizer.decode([i]) for i in base.token_ids[3:]) if t and t not in base.text[:2])
    [r] = engine.generate([PROMPT], [images[0]], max_new_tokens=12, stop=[stop])
    assert r.finish_reason == "stop"
    assert r.text == base.text[:base.text.index(stop)]
    assert stop not in r.text


def test_eos_ends_generation(engine, images):
    base = engine.generate([PROMPT], [images[0]], max_new_tokens=8)[0].token_ids
    eos = base[4]
    saved = engine.manifest.eos_token_ids
    engine.manifest.eos_token_ids = [eos]
    try:
        [r] = engine.generate([PROMPT], [images[0]], max_new_tokens=8)
    finally:
        engine.manifest.eos_token_ids = saved
    assert r.finish_reason == "stop"
    assert r.token_ids == base[:base.index(eos) + 1]


def test_max_seq_len_caps_generation(engine, images):
    full = engine.generate([PROMPT], [images[0]], max_new_tokens=8)[0]
    limits = engine.manifest.limits
    saved = limits.max_seq_len
    limits.max_seq_len = full.prompt_tokens + 3
    try:
        [r] = engine.generate([PROMPT], [images[0]], max_new_tokens=8)
    finally:
        limits.max_seq_len = saved
    assert r.finish_reason == "length" and r.token_ids == full.token_ids[:3]


def test_timings_and_flops_are_reported(engine, images):
    [r] = engine.generate([PROMPT], [images[0]], max_new_tokens=4)
    t = r.timings
    assert 0 < t["vision_s"] < t["ttft_s"] <= t["total_s"] and t["decode_tokens_per_s"] > 0
    assert 0 < r.flops["paper"]["ratio"] < r.flops["full"]["ratio"] < 1
    assert math.isclose(r.flops["paper"]["drop"] / r.flops["paper"]["no_drop"], r.flops["paper"]["ratio"])


def test_bad_requests_are_refused(engine, images):
    with pytest.raises(InputError, match="max_batch_size"):
        engine.generate([PROMPT] * 9, [images[0]] * 9)
    with pytest.raises(InputError, match="2 prompts but 1 images"):
        engine.generate([PROMPT, PROMPT], [images[0]])
    with pytest.raises(InputError, match="no image was given"):
        engine.generate([PROMPT], [None])
    with pytest.raises(InputError, match="top_p"):
        engine.generate([PROMPT], [images[0]], top_p=0.0)
    for end_id in (10**9, -5, engine.manifest.llm.vocab_size):
        with pytest.raises(InputError, match=r"end_id must be a token id in \[0, 264\)"):
            engine.prepare(PROMPT, images[0], SamplingParams(end_id=end_id, min_tokens=3))
    for shape in ((0, 0, 3), (0, 5, 3), (5, 0, 3)):
        with pytest.raises(InputError, match="H, W > 0"):
            engine.generate([PROMPT], [np.zeros(shape, dtype=np.uint8)])


def test_end_id_min_tokens_and_bad_words(engine, images):
    from builder.runtime.sampling import SamplingParams

    base = engine.generate([PROMPT], [images[0]], max_new_tokens=8)[0].token_ids

    def run(**kw):
        return engine.generate([PROMPT], [images[0]], params=[SamplingParams(max_new_tokens=8, **kw)])[0]

    stopped = run(end_id=base[1])
    assert stopped.token_ids == base[:2] and stopped.finish_reason == "stop"
    late = run(end_id=base[1], min_tokens=4)
    assert late.token_ids[0] == base[0] and len(late.token_ids) >= 4
    assert base[1] not in late.token_ids[:4]
    tok = engine.tokenizer
    j = next(j for j in range(1, 8) if tok.encode(tok.decode([base[j]]), add_special_tokens=False) == [base[j]])
    banned = run(bad_words=[tok.decode([base[j]])])
    assert banned.token_ids[:j] == base[:j] and base[j] not in banned.token_ids
