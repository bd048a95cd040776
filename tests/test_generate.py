"""Generation API: streaming, sampling, stop words, EOS, length limits."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from builder.format.errors import InputError
from builder.runtime.sampling import SamplingParams, filter_logits, penalize

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


def test_penalties_equal_hugging_face_and_the_formula():
    """Repetition as transformers' RepetitionPenaltyLogitsProcessor (over prompt and answer);
    presence and frequency as vLLM's (over the answer): logit -= presence + frequency * count."""
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=g)
    prompt, answer = [3, 7, 7, 20], [7, 9, 9, 9, 41]
    # as the sampler keeps them: a mask of the prompt's tokens, the answer's counts
    tokens = torch.bincount(torch.tensor(prompt), minlength=50) > 0, torch.bincount(torch.tensor(answer), minlength=50)
    p = SamplingParams(repetition_penalty=1.3)
    hf = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + answer]), logits[None].clone())[0]
    assert torch.equal(penalize(logits, *tokens, p), hf)
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    expected = logits.clone()
    for token in set(answer):
        expected[token] -= 0.5 + 0.25 * answer.count(token)
    assert torch.allclose(penalize(logits, *tokens, p), expected)
    assert torch.equal(penalize(logits, *tokens, SamplingParams()), logits)


def test_a_presence_penalty_stops_repeats(engine, images):
    plain = engine.generate([PROMPT], [images[0]], max_new_tokens=16)[0].token_ids
    assert len(set(plain)) < len(plain)  # this random model repeats itself
    penalized = engine.generate([PROMPT], [images[0]], params=[SamplingParams(16, presence_penalty=1e4)])[0].token_ids
    assert len(set(penalized)) == len(penalized) == 16


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
        # end_id -1 (TensorRT-LLM's "none"): no end token, the answer runs to its length
        [endless] = engine.generate([PROMPT], [images[0]], params=[SamplingParams(8, end_id=-1)])
    finally:
        engine.manifest.eos_token_ids = saved
    assert r.finish_reason == "stop"
    assert r.token_ids == base[:base.index(eos) + 1]
    assert endless.finish_reason == "length" and endless.token_ids == base


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
        with pytest.raises(InputError, match=r"end_id must be a token id in \[0, 264\) or -1"):
            engine.prepare(PROMPT, images[0], SamplingParams(end_id=end_id, min_tokens=3))
    for shape in ((0, 0, 3), (0, 5, 3), (5, 0, 3)):
        with pytest.raises(InputError, match="H, W > 0"):
            engine.generate([PROMPT], [np.zeros(shape, dtype=np.uint8)])
    for bad in (dict(repetition_penalty=0.0), dict(presence_penalty=math.inf), dict(frequency_penalty=math.nan)):
        with pytest.raises(InputError, match=next(iter(bad))):
            engine.prepare(PROMPT, images[0], SamplingParams(**bad))


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares its size and holds no pixels: what a reader sees before decoding."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def test_oversized_prompts_and_images_are_refused_before_decoding(engine):
    """A 10 MB prompt is refused by its byte length, before the tokenizer sees it; a 100-megapixel
    image by the size in its header, before its pixels are decoded."""
    limits = engine.manifest.limits
    with pytest.raises(InputError, match=f"prompt is 10000000 bytes, more than {limits.max_input_len} tokens"):
        engine.prepare("x" * 10_000_000, None, SamplingParams())
    words = " ".join(["word"] * (limits.max_input_len + 64))  # under the byte bound, still too many tokens
    assert len(words.encode()) < limits.max_input_len * engine.max_token_bytes
    with pytest.raises(InputError, match=r"prompt is \d+ tokens"):
        engine.prepare(words, None, SamplingParams())
    with pytest.raises(InputError, match=r"image is 10000x10000 \(100.0 MP\), above this engine's limit of 50 MP"):
        engine.prepare(PROMPT, png_header(10000, 10000), SamplingParams())
    assert limits.max_image_pixels == 50_000_000


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
