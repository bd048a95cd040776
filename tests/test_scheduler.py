"""The step scheduler over the paged KV pool: exact under concurrency, honest about memory, never stuck."""
from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from builder.format.errors import EngineError, InputError
from builder.runtime.engine import Engine
from builder.runtime.sampling import SamplingParams

PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"


def solo(engine, prompt, image, params, drop):
    """The request alone: its own one-at-a-time greedy run."""
    return engine.generate([prompt], [image], params=[params], drop_ratio=drop)[0]


def submit(engine, prompt, image, params, drop, events, index):
    req = engine.prepare(prompt, image, params, drop)
    return engine.scheduler.submit(req, lambda e, i=index: events.setdefault(i, []).append(e), index)


def run_until_idle(engine):
    with torch.inference_mode():
        while not engine.scheduler.idle():
            engine.scheduler.step()


def final(events):
    [last] = [e for e in events if e.result is not None]
    return last.result


@pytest.fixture
def fresh(engine_dir):
    """A private engine per test: its pool and queue start empty."""
    def load(**kw):
        return Engine.load(engine_dir, device="cpu", **kw)
    return load


def workload(images, n, seed):
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        image = rng.choice(images[:5] + [None, None])
        prompt = PROMPT if image is not None else f"USER: tell me story {i} ASSISTANT:"
        stop = [rng.choice(["a", "e", "o"])] if rng.random() < 0.3 else []
        params = SamplingParams(max_new_tokens=rng.randint(2, 12), stop=stop)
        cases.append((prompt, image, params, rng.choice([0.0, 0.5, 0.75])))
    return cases


@pytest.mark.parametrize("seed", [0, 1])
def test_random_arrivals_and_cancels_equal_one_at_a_time(fresh, images, seed):
    engine = fresh()
    cases = workload(images, 12, seed)
    rng = random.Random(100 + seed)
    cancel_at = {rng.randrange(len(cases)): rng.randint(0, 6) for _ in range(2)}  # request -> steps after submit
    events, handles, pending, step, most_running = {}, {}, list(range(len(cases))), 0, 0
    with torch.inference_mode():
        while pending or not engine.scheduler.idle():
            while pending and rng.random() < 0.4:  # submissions between steps, in bursts
                i = pending.pop(0)
                handles[i] = (submit(engine, *cases[i], events, i), step)
            for i, at in cancel_at.items():
                if i in handles and step - handles[i][1] == at:
                    handles[i][0].cancel()
            engine.scheduler.step()
            step += 1
            most_running = max(most_running, engine.scheduler.stats()["running"])
    assert 3 <= most_running <= engine.manifest.limits.max_batch_size
    assert any(final(events[i]).finish_reason == "cancelled" for i in cancel_at)
    for i, (prompt, image, params, drop) in enumerate(cases):
        got, want = final(events[i]), solo(engine, prompt, image, params, drop)
        assert "".join(e.text for e in events[i]) == got.text
        if got.finish_reason == "cancelled":
            assert i in cancel_at and got.token_ids == want.token_ids[:len(got.token_ids)]
            continue
        assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
        assert [s.kept for s in got.stages] == [s.kept for s in want.stages]
    assert engine.stats()["kv_blocks_free"] == engine.pool.num_blocks  # every block came back


def test_a_request_holds_the_blocks_its_stage_lengths_predict(fresh, images):
    engine = fresh()
    bs, n_layers = engine.pool.block_size, engine.manifest.llm.n_layers
    held = {}
    for drop in (0.0, 0.5):
        events = {}
        submit(engine, PROMPT, images[0], SamplingParams(max_new_tokens=7), drop, events, 0)
        with torch.inference_mode():
            engine.scheduler.step()  # admitted, first stage prefilled
        [seq] = engine.scheduler.active
        req, n_image = seq.req, seq.req.image_tokens
        text = req.prompt_tokens - n_image
        stage = [sum(i >= b for b in (2, 4, 6)) for i in range(n_layers)]  # 0 0 1 1 2 2 3 3
        kept = [int(n_image * (1 - drop) ** s) for s in stage]
        expected = [math.ceil((text + k + 7) / bs) for k in kept]
        assert seq.kv.n_blocks == expected
        held[drop] = engine.stats()["kv_blocks_used"]
        assert held[drop] == sum(expected)
        run_until_idle(engine)
        assert engine.stats()["kv_blocks_free"] == engine.pool.num_blocks
    assert held[0.5] < held[0.0]  # the deeper stages hold only the survivors


def test_an_exhausted_pool_queues_and_then_completes_everything(fresh, images):
    engine = fresh(kv_cache_tokens=300)  # about one image request at a time
    cases = [(PROMPT, images[i % 3], SamplingParams(max_new_tokens=5), 0.5) for i in range(4)]
    cases.append(("USER: hi ASSISTANT:", None, SamplingParams(max_new_tokens=5), 0.5))
    events = {}
    for i, case in enumerate(cases):
        submit(engine, *case, events, i)
    most_running, most_queued = 0, 0
    with torch.inference_mode():
        while not engine.scheduler.idle():
            engine.scheduler.step()
            stats = engine.scheduler.stats()
            most_running, most_queued = max(most_running, stats["running"]), max(most_queued, stats["queued"])
            assert stats["kv_blocks_used"] + stats["kv_blocks_free"] == engine.pool.num_blocks
    assert most_queued >= 2 and most_running < len(cases)
    for i, case in enumerate(cases):
        assert final(events[i]).token_ids == solo(engine, *case).token_ids


def test_queue_limit_oversize_and_a_good_request_afterwards(fresh, images):
    engine = fresh(max_queued_requests=2, kv_cache_tokens=300)
    events = {}
    for i in range(2):
        submit(engine, PROMPT, images[0], SamplingParams(max_new_tokens=3), 0.5, events, i)
    with pytest.raises(InputError, match="server busy: 2 requests queued"):
        submit(engine, PROMPT, images[0], SamplingParams(max_new_tokens=3), 0.5, events, 2)
    with pytest.raises(InputError, match="KV blocks"):  # can never fit: refused at once, not queued
        submit(engine, PROMPT, images[0], SamplingParams(max_new_tokens=400), 0.0, events, 3)
    run_until_idle(engine)
    assert sorted(events) == [0, 1]
    params = SamplingParams(max_new_tokens=4)
    [r] = engine.generate(["USER: hi ASSISTANT:"], [None], params=[params])
    assert len(r.token_ids) == 4 and engine.stats()["kv_blocks_free"] == engine.pool.num_blocks


def test_never_written_pool_memory_cannot_leak_into_answers(fresh, engine, images):
    """Masked slots still meet their values as 0 * v: a pool whose fresh memory holds NaN (as reused
    memory may) must give the same answers as any other."""
    poisoned = fresh()
    poisoned.pool.k.fill_(float("nan"))
    poisoned.pool.v.fill_(float("nan"))
    poisoned.pool.k[0], poisoned.pool.v[0] = 0, 0  # as the pool leaves its null block
    prompts, imgs = [PROMPT, "USER: hi ASSISTANT:", PROMPT], [images[0], None, images[4]]
    kw = dict(max_new_tokens=6, temperature=1.0, seed=3)
    got = poisoned.generate(prompts, imgs, **kw)
    assert [r.token_ids for r in got] == [r.token_ids for r in engine.generate(prompts, imgs, **kw)]


def test_pool_size_options_are_checked(fresh):
    with pytest.raises(InputError, match="kv_cache_memory_fraction .* needs a CUDA device"):
        fresh(kv_cache_memory_fraction=0.5)
    with pytest.raises(InputError, match="unknown scheduler 'fifo'"):
        fresh(scheduler="fifo")
    engine = fresh(kv_cache_tokens=160)
    assert engine.pool.num_blocks == 8 * 10  # 8 layers x ceil(160 / 16) blocks


def test_a_long_prefill_does_not_stall_running_streams(fresh, images):
    """In flight, a new request's prefill advances one pyramid stage per step, with a decode step
    for the running streams in between; the static baseline admits nobody while a batch runs."""
    for policy, least in (("inflight", 3), ("static", 0)):
        engine = fresh(scheduler=policy)
        events = {}
        submit(engine, "USER: hi ASSISTANT:", None, SamplingParams(max_new_tokens=30), 0.0, events, 0)
        with torch.inference_mode():
            engine.scheduler.step()
            engine.scheduler.step()
            submit(engine, PROMPT, images[0], SamplingParams(max_new_tokens=2), 0.5, events, 1)
            while 1 not in events:
                engine.scheduler.step()
            streamed_meanwhile = len(events[0]) - 2
            run_until_idle(engine)
        assert streamed_meanwhile >= least, policy
        if policy == "static":  # the first batch ran to its end before the second was admitted
            assert streamed_meanwhile == 28 and final(events[0]).finish_reason == "length"


def test_static_policy_gives_the_same_answers(fresh, images):
    engine = fresh(scheduler="static")
    cases = workload(images, 6, 3)
    events = {}
    for i, case in enumerate(cases):
        submit(engine, *case, events, i)
    run_until_idle(engine)
    for i, case in enumerate(cases):
        assert final(events[i]).token_ids == solo(engine, *case).token_ids


def test_its_own_thread_serves_submissions_from_other_threads(fresh, images):
    engine = fresh()
    engine.scheduler.start()
    try:
        cases = workload(images, 6, 5)
        results = [None] * len(cases)

        def client(i):
            results[i] = engine.generate([cases[i][0]], [cases[i][1]], params=[cases[i][2]],
                                         drop_ratio=cases[i][3])[0]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(cases))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        engine.scheduler.stop()
    for case, got in zip(cases, results):
        assert got.token_ids == solo(engine, *case).token_ids
    assert engine.stats()["kv_blocks_free"] == engine.pool.num_blocks


@pytest.mark.parametrize("shape,pool_gib", [("llava-next-vicuna-7b", 100), ("llava-next-small", 4)])
def test_drop_half_admits_about_twice_the_requests_at_a_fixed_pool(shape, pool_gib, tmp_path):
    """scripts/bench_kv_capacity.py: the real scheduler's admission over a meta-device pool."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_kv_capacity.py"
    out = subprocess.run([sys.executable, str(script), "--shape", shape, "--pool-gib", str(pool_gib),
                          "--json", str(tmp_path / "kv.json")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    base, drop = json.loads((tmp_path / "kv.json").read_text())["rows"]
    assert base["admitted"] * base["kv_bytes_per_request"] <= pool_gib * 2**30 < (base["admitted"] + 1) * base[
        "kv_bytes_per_request"]
    assert drop["admitted"] >= 1.8 * base["admitted"]
    assert [s["kv_bytes"] for s in drop["stages"]] == sorted((s["kv_bytes"] for s in drop["stages"]), reverse=True)


def test_a_request_that_raises_fails_alone_and_the_others_answer_exactly(fresh, images):
    """Out of memory in one request's prefill fails that request only; an exception in a decode step
    fails that step's requests only; the pool comes back whole and later requests are served."""
    engine = fresh()
    params = SamplingParams(max_new_tokens=6)
    reqs = [engine.prepare(PROMPT, images[i], params, 0.5) for i in range(3)]
    embed = engine.embed

    def embed_or_run_out(req, features=None):
        if req is reqs[1]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nSee the docs")
        return embed(req, features)

    engine.embed = embed_or_run_out
    events = {}
    for i, req in enumerate(reqs):
        engine.scheduler.submit(req, lambda e, i=i: events.setdefault(i, []).append(e), i)
    run_until_idle(engine)
    [error] = events[1]
    assert str(error) == "generation failed: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB."
    for i in (0, 2):
        assert final(events[i]).token_ids == solo(engine, PROMPT, images[i], params, 0.5).token_ids
    assert engine.stats()["kv_blocks_free"] == engine.pool.num_blocks

    step, failed = engine.decoder.step, []

    def fail_once(tokens, seqs):
        if not failed:
            failed.append(len(seqs))
            raise RuntimeError("boom")
        return step(tokens, seqs)

    engine.decoder.step = fail_once
    events = {}
    submit(engine, PROMPT, images[0], params, 0.5, events, 0)
    run_until_idle(engine)
    first, error = events[0]  # the prefill's token, then the failed step
    assert failed == [1] and first.token_id is not None and str(error) == "generation failed: RuntimeError: boom"
    events = {}
    submit(engine, PROMPT, images[2], params, 0.5, events, 0)
    run_until_idle(engine)
    assert final(events[0]).token_ids == solo(engine, PROMPT, images[2], params, 0.5).token_ids
    assert engine.stats()["kv_blocks_free"] == engine.pool.num_blocks


def test_an_unusable_device_fails_everything_once_and_refuses_new_requests(fresh, images, capsys):
    """A sticky device error (as CUDA's illegal address leaves) is logged once; every request gets it;
    new requests are refused at once with the same one line, never admitted to fail one by one."""
    engine = fresh()
    message = "the CUDA device cuda:0 is unusable after an error (an illegal memory access); restart the server"
    engine.device_error = lambda: message

    def illegal(req, features=None):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    engine.embed = illegal
    events = {}
    params = SamplingParams(max_new_tokens=4)
    for i in range(3):
        submit(engine, PROMPT, images[i], params, 0.5, events, i)
    run_until_idle(engine)
    assert all([str(e) for e in events[i]] == [message] for i in range(3)), events
    with pytest.raises(EngineError, match="unusable after an error"):
        submit(engine, PROMPT, images[0], params, 0.5, events, 3)
    assert capsys.readouterr().err.splitlines() == [f"pdrop: {message}"]
    assert engine.stats()["kv_blocks_free"] == engine.pool.num_blocks
