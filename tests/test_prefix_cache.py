"""The prefix cache keeps PyramidDrop exact: with it on, every answer and kept set equals the answer
of an engine without it, token for token, under random arrivals of repeated and new images with
different questions, drop 0, 0.5 and 0.75, cancels, and eviction from a small pool."""
from __future__ import annotations

import random

import pytest
import torch
from conftest import make_image

from builder.format.errors import InputError
from builder.runtime.engine import Engine
from builder.runtime.sampling import SamplingParams

QUESTIONS = ["What is in the picture?", "Describe the colours, please.", "How many shapes are there?",
             "Is it day or night? Answer in one word and then explain why you think so."]


def prompt(question: str) -> str:
    return f"USER: <image>\n{question} ASSISTANT:"


@pytest.fixture(scope="module")
def plain(engine_dir):
    return Engine.load(engine_dir, device="cpu", prefix_cache_tokens=0)


def solo(engine, text, image, params, drop, image_id=None):
    req = engine.prepare(text, image, params, drop, image_id=image_id)
    return next(d.result for d in engine.stream_prepared([req]) if d.result is not None)


def run(engine, cases, seed, cancels=()):
    """Submit `cases` (prompt, image, params, drop) in random bursts between steps; cancel the
    requests in `cancels` a few steps after they arrive. Returns each request's result."""
    rng = random.Random(seed)
    results, handles, pending, step = {}, {}, list(range(len(cases))), 0

    def keep(i):
        return lambda event: results.__setitem__(i, event.result) if event.result is not None else None

    with torch.inference_mode():
        while pending or not engine.scheduler.idle():
            while pending and rng.random() < 0.5:
                i = pending.pop(0)
                handles[i] = (engine.submit(engine.prepare(*cases[i]), keep(i), i), step)
            for i in cancels:
                if i in handles and step - handles[i][1] == 2:
                    handles[i][0].cancel()
            engine.scheduler.step()
            step += 1
    return results


@pytest.mark.parametrize("seed", [0, 1])
def test_answers_equal_the_cache_off_answers_under_random_arrivals_and_eviction(engine_dir, plain, seed):
    """A pool of ~3 requests and a cache of ~4 prefixes: entries are evicted and made again while
    4 images x 4 questions x 3 drop ratios arrive in random order, two of them cancelled."""
    engine = Engine.load(engine_dir, device="cpu", kv_cache_tokens=1024, prefix_cache_tokens=768)
    rng = random.Random(seed)
    images = [make_image(200 + 60 * i, 300 - 40 * i, seed=10 + i) for i in range(4)]
    cases = [(prompt(rng.choice(QUESTIONS)), rng.choice(images),
              SamplingParams(max_new_tokens=rng.randint(3, 9)), rng.choice([0.0, 0.5, 0.75])) for _ in range(24)]
    cancels = rng.sample(range(len(cases)), 2)
    got = run(engine, cases, seed, cancels)
    stats = engine.prefix_cache.stats
    assert stats.hits >= 3 and stats.misses >= 4 and stats.evicted >= 1, stats
    for i, (text, image, params, drop) in enumerate(cases):
        want = solo(plain, text, image, params, drop)
        if got[i].finish_reason == "cancelled":
            assert i in cancels and got[i].token_ids == want.token_ids[:len(got[i].token_ids)]
            continue
        assert got[i].token_ids == want.token_ids, i
        assert [s.kept for s in got[i].stages] == [s.kept for s in want.stages], i
    # nothing in use: every cached block can be evicted, and the pool is whole again
    assert engine.stats()["kv_blocks_free"] == engine.pool.num_blocks
    assert engine.prefix_cache.evict(engine.prefix_cache.n_blocks)
    assert engine.pool.n_free == engine.pool.num_blocks and not engine.prefix_cache.entries


def test_a_second_question_reuses_the_image_and_the_first_stage(engine_dir, plain):
    """What an entry holds at drop 0.5 (the first stage's layers) and at drop 0 (every layer), and
    what the second question then runs: only its own text through the shared layers."""
    engine = Engine.load(engine_dir, device="cpu")
    cfg, bs = engine.manifest.llm, engine.pool.block_size
    image, params = make_image(300, 400, seed=3), SamplingParams(max_new_tokens=6)
    towers = []
    features = engine.image_features
    engine.image_features = lambda req: (towers.append(1), features(req))[1]
    for drop, depth in ((0.5, 2), (0.0, cfg.n_layers)):
        first = solo(engine, prompt(QUESTIONS[0]), image, params, drop)
        [entry] = [e for e in engine.prefix_cache.entries.values() if e.key.depth == depth]
        assert entry.tokens == len(entry.key.prefix) // bs * bs and entry.tokens > first.image_tokens - bs
        assert entry.n_blocks == entry.tokens // bs * depth
        assert (entry.hidden is None) == (depth == cfg.n_layers)
        second = solo(engine, prompt(QUESTIONS[1]), image, params, drop)
        want = solo(plain, prompt(QUESTIONS[1]), image, params, drop)
        assert second.token_ids == want.token_ids and [s.kept for s in second.stages] == [s.kept for s in want.stages]
    assert len(towers) == 1  # the vision tower ran for the first request only
    assert engine.prefix_cache.stats.hits == 2 and engine.prefix_cache.stats.misses == 2  # a miss per depth


def test_requests_admitted_together_share_the_entry_the_first_makes(engine_dir, plain):
    """Three questions about one image arrive at once and are admitted in one step, before any entry
    exists: the first makes it, the others take it when their prefill starts (their own first-stage
    blocks go back to the pool)."""
    engine = Engine.load(engine_dir, device="cpu")
    image, params = make_image(300, 400, seed=6), SamplingParams(max_new_tokens=5)
    reqs = [engine.prepare(prompt(q), image, params, 0.5) for q in QUESTIONS[:3]]
    got = {d.index: d.result for d in engine.stream_prepared(reqs) if d.result is not None}
    stats = engine.prefix_cache.stats
    assert (stats.hits, stats.misses) == (2, 1)
    for i, q in enumerate(QUESTIONS[:3]):
        assert got[i].token_ids == solo(plain, prompt(q), image, params, 0.5).token_ids
    assert engine.stats()["kv_blocks_free"] == engine.pool.num_blocks


def test_a_client_image_id_names_the_image(engine_dir, plain):
    """TensorRT-LLM's prompt_table_extra_id: requests that send one share by it, not by the pixels."""
    engine = Engine.load(engine_dir, device="cpu")
    image, params = make_image(300, 400, seed=4), SamplingParams(max_new_tokens=5)
    solo(engine, prompt(QUESTIONS[0]), image, params, 0.5, image_id=7)
    solo(engine, prompt(QUESTIONS[1]), image, params, 0.5)  # the same pixels without the id: a miss
    got = solo(engine, prompt(QUESTIONS[2]), image, params, 0.5, image_id=7)
    assert engine.prefix_cache.stats.hits == 1 and engine.prefix_cache.stats.misses == 2
    assert got.token_ids == solo(plain, prompt(QUESTIONS[2]), image, params, 0.5).token_ids


def test_a_client_image_id_never_answers_from_another_image(engine_dir, plain):
    """The same id sent with other pixels (same size, then another size): a miss, answered from its
    own image, never from the entry of the image the id first came with."""
    engine = Engine.load(engine_dir, device="cpu")
    params = SamplingParams(max_new_tokens=5)
    first, same_size, other_size = make_image(300, 400, seed=4), make_image(300, 400, seed=9), make_image(90, 60)
    solo(engine, prompt(QUESTIONS[0]), first, params, 0.5, image_id=7)
    for image in (same_size, other_size):
        got = solo(engine, prompt(QUESTIONS[1]), image, params, 0.5, image_id=7)
        assert got.token_ids == solo(plain, prompt(QUESTIONS[1]), image, params, 0.5).token_ids
    assert engine.prefix_cache.stats.hits == 0 and engine.prefix_cache.stats.misses == 3


def test_a_failure_while_an_entry_is_made_fails_its_request_and_frees_every_block(engine_dir, monkeypatch):
    from builder.runtime import prefix_cache

    engine = Engine.load(engine_dir, device="cpu")

    def broken(*args, **kwargs):
        raise RuntimeError("host copy failed")

    monkeypatch.setattr(prefix_cache, "Entry", broken)
    events = []
    engine.submit(engine.prepare(prompt(QUESTIONS[0]), make_image(300, 400, seed=6), SamplingParams(5), 0.5),
                  events.append)
    while not events or events[-1].__class__.__name__ == "Delta" and events[-1].result is None:
        engine.scheduler.step()
    assert "generation failed: RuntimeError: host copy failed" in str(events[-1])
    assert engine.stats()["kv_blocks_free"] == engine.pool.num_blocks and not engine.prefix_cache.entries


def test_an_image_the_processor_refuses_is_one_input_error(engine_dir, monkeypatch):
    engine = Engine.load(engine_dir, device="cpu")

    def refuse(*args, **kwargs):
        raise ValueError("unsupported image mode\nmore detail")

    monkeypatch.setattr(engine, "processor", refuse)
    with pytest.raises(InputError, match=r"^cannot preprocess the request: ValueError: unsupported image mode$"):
        engine.prepare(prompt(QUESTIONS[0]), make_image(30, 40), SamplingParams(5), 0.5)


def test_an_entry_in_use_is_never_evicted(engine_dir):
    engine = Engine.load(engine_dir, device="cpu")
    cache = engine.prefix_cache
    image, params = make_image(300, 400, seed=5), SamplingParams(max_new_tokens=30)
    solo(engine, prompt(QUESTIONS[0]), image, params, 0.5)
    events = []
    engine.submit(engine.prepare(prompt(QUESTIONS[1]), image, params, 0.5), events.append)
    with torch.inference_mode():
        engine.scheduler.step()
    [entry] = cache.entries.values()
    assert entry.users == 1 and not cache.evict(1) and cache.entries
    with torch.inference_mode():
        while not engine.scheduler.idle():
            engine.scheduler.step()
    assert entry.users == 0 and cache.evict(1) and not cache.entries


def test_prefix_cache_tokens_must_not_be_negative(engine_dir):
    with pytest.raises(InputError, match="prefix_cache_tokens must be >= 0"):
        Engine.load(engine_dir, device="cpu", prefix_cache_tokens=-1)
