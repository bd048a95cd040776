"""The sampler keeps each request's bans and penalties on the device: the tokens it picks are the plain
rules' (kept here as host code, as the sampler was), and after its first call it copies nothing from
the host (a copy per row per step would be a sync per row on a GPU)."""
from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch
from conftest import prefill
from recorder import Recorder

from builder.runtime.sampling import Sampler, SamplingParams, filter_logits

VOCAB = 12  # small, so that histories often end in a bad word's prefix and repeat tokens


def reference(logits: torch.Tensor, prompt: list[int], history: list[int], p: SamplingParams, eos: set[int],
              bad: list[list[int]], generator: torch.Generator | None) -> int:
    """The rules on host lists: repetition over the prompt's and the history's tokens, presence and
    frequency over the history's, a bad word's last token banned after the rest of it, EOS before
    min_tokens."""
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt) | set(history)), dtype=torch.long)
        hit = logits[seen]
        logits = logits.index_copy(0, seen, torch.where(hit > 0, hit / p.repetition_penalty,
                                                        hit * p.repetition_penalty))
    if history and (p.presence_penalty or p.frequency_penalty):
        ids, counts = torch.tensor(history).unique(return_counts=True)
        logits = logits.index_add(0, ids, -(p.presence_penalty + p.frequency_penalty * counts).to(logits.dtype))
    banned = [w[-1] for w in bad if w and history[len(history) - len(w) + 1:] == w[:-1]]
    if len(history) < p.min_tokens:
        banned += sorted(eos)
    if banned:
        logits = logits.index_fill(0, torch.tensor(banned), -math.inf)
    if generator is None:
        return int(logits.argmax())
    probs = filter_logits(logits.float() / p.temperature, p.top_k, p.top_p).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator)[0])


def random_request(rng: random.Random) -> tuple[SamplingParams, set[int], list[list[int]], list[int]]:
    params = SamplingParams(temperature=rng.choice([0.0, 0.0, 0.7, 1.5]), top_k=rng.choice([0, 3]),
                            top_p=rng.choice([1.0, 0.8]), seed=rng.randrange(1000), min_tokens=rng.randrange(5),
                            repetition_penalty=rng.choice([1.0, 1.3, 0.7]),
                            presence_penalty=rng.choice([0.0, 0.5, -0.4]), frequency_penalty=rng.choice([0.0, 0.25]))
    eos = set(rng.sample(range(VOCAB), rng.randrange(3)))  # none: end_id -1
    bad = [rng.choices(range(VOCAB), k=rng.randrange(4)) for _ in range(rng.randrange(4))]  # [] as the sampler gets it
    return params, eos, bad, rng.choices(range(VOCAB), k=rng.randrange(7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_sampler_picks_what_the_plain_rules_pick(dtype):
    rng, g = random.Random(0), torch.Generator().manual_seed(0)
    matched = 0  # steps where a bad word of several tokens had its prefix in place
    for _ in range(300):
        params, eos, bad, prompt = random_request(rng)
        sampler = Sampler(params, torch.device("cpu"), eos, bad, prompt)
        ref_gen = torch.Generator().manual_seed(params.seed) if params.temperature > 0 else None
        history: list[int] = []
        for _ in range(8):
            logits = (3 * torch.randn(VOCAB, generator=g)).to(dtype)
            want = reference(logits, prompt, history, params, eos, bad, ref_gen)
            matched += any(len(w) > 1 and history[-(len(w) - 1):] == w[:-1] for w in bad)
            got = sampler(logits, history)
            assert got.shape == () and int(got) == want
            history.append(want if rng.random() < 0.5 else rng.randrange(VOCAB))  # sampled, or forced
    assert matched > 50


def test_a_call_after_the_first_makes_no_tensor_from_host_data():
    """Every rule in use: penalties, min_tokens' EOS ban, bad words of one and of several tokens."""
    params = SamplingParams(temperature=0.8, top_k=5, top_p=0.9, seed=1, min_tokens=6, repetition_penalty=1.2,
                            presence_penalty=0.5, frequency_penalty=0.3)
    sampler = Sampler(params, torch.device("cpu"), {2}, [[7], [3, 4], [4, 3, 5]], prompt=[1, 3, 3, 9])
    history: list[int] = []
    g = torch.Generator().manual_seed(0)
    sampler(torch.randn(VOCAB, generator=g), history)  # the first call makes the vocabulary-sized state
    for token in (3, 4, 3, 3, 8):
        history.append(token)
        with Recorder() as rec:
            sampler(torch.randn(VOCAB, generator=g), history)
        assert [f"{op.hazard()}: {op}" for op in rec.ops if op.hazard() not in (None, "random numbers")] == []
        assert any(op.name == "index_fill" for op in rec.ops)  # what it bans is banned all the same
    assert torch.equal(sampler.counts, torch.bincount(torch.tensor(history), minlength=VOCAB))


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_log_probabilities_are_those_of_the_engines_logits(engine, temperature):
    """fp32: each token's logprob equals log-softmax of the engine's own next-token logits (scaled by
    the temperature when sampling) within 1e-4; the top alternatives are the largest, in order, and
    greedy's token is the first of them."""
    prompt = "USER: count to ten ASSISTANT:"
    params = SamplingParams(6, temperature=temperature, seed=1, end_id=-1, logprobs=3)
    [got] = engine.generate([prompt], params=[params])
    assert len(got.logprobs) == len(got.token_ids) == 6
    req = engine.prepare(prompt, None, SamplingParams())
    for step, (token, lp) in enumerate(zip(got.token_ids, got.logprobs)):
        # the prompt and the tokens before this one, prefilled again: the logits this token came from
        before = torch.tensor(got.token_ids[:step], dtype=torch.long)
        again = dataclasses.replace(req, input_ids=torch.cat((req.input_ids, before)))
        with torch.inference_mode():
            _, h, _ = prefill(engine, again)
            logits = engine.llm.output(h)[0, -1].float()
        want = (logits / (temperature or 1.0)).log_softmax(-1)
        assert lp.token_id == token and abs(lp.logprob - want[token].item()) < 1e-4
        values, indices = want.topk(3)
        assert [i for i, _ in lp.top] == indices.tolist()
        assert max(abs(a - b) for (_, a), b in zip(lp.top, values.tolist())) < 1e-4
        if temperature == 0:
            assert lp.top[0][0] == token


def test_no_log_probabilities_unless_asked(engine):
    [got] = engine.generate(["USER: hi ASSISTANT:"], max_new_tokens=3)
    assert got.logprobs is None and "logprobs" not in got.to_dict()
    with pytest.raises(Exception, match="logprobs must be in 0..20"):
        SamplingParams(3, logprobs=21).validate()
