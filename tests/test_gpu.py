"""The same exactness checks on a CUDA device (`pytest -m gpu`); skipped where there is none."""
from __future__ import annotations

import pytest
import torch
from conftest import DEMO_LAYERS, prefill
from reference import Reference

from builder.runtime.engine import Engine
from builder.runtime.sampling import SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]

PROMPT = "USER: <image>\nWhat is here? ASSISTANT:"


@pytest.fixture(scope="module")
def cuda_engine(engine_dir):
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 exactness, not TF32
    return Engine.load(engine_dir, device="cuda")


def test_cuda_greedy_equals_cpu(cuda_engine, engine, images):
    for drop in (0.0, 0.5):
        prompts, imgs = [PROMPT, PROMPT, "USER: hi ASSISTANT:"], [images[0], images[3], None]
        gpu = cuda_engine.generate(prompts, imgs, max_new_tokens=16, drop_ratio=drop)
        cpu = engine.generate(prompts, imgs, max_new_tokens=16, drop_ratio=drop)
        for g, c in zip(gpu, cpu):
            assert g.token_ids == c.token_ids
            assert [s.kept for s in g.stages] == [s.kept for s in c.stages]


def test_cuda_prefill_matches_reference(cuda_engine, demo_ckpt, images):
    req = cuda_engine.prepare(PROMPT, images[0], SamplingParams(), drop_ratio=0.5)
    embeds, h, stages = prefill(cuda_engine, req)
    with torch.inference_mode():
        ours = cuda_engine.llm.output(h[0, -1]).cpu()
    ref, kept = Reference(demo_ckpt).forward(embeds[0].cpu(), req.input_ids.numel(), req.image_start, req.n_image,
                                             DEMO_LAYERS, 0.5)
    assert kept == [s.kept for s in stages]
    assert (ours - ref).abs().max().item() <= 1e-3


def test_cuda_bfloat16_runs(engine_dir, images):
    engine = Engine.load(engine_dir, device="cuda", dtype="bfloat16")
    [r] = engine.generate([PROMPT], [images[0]], max_new_tokens=8)
    assert len(r.token_ids) == 8 and [s.tokens_kept for s in r.stages] == [84, 42, 21]


@pytest.mark.parametrize("drop", [0.0, 0.5])
def test_cuda_graph_decode_equals_eager_for_64_steps(engine_dir, images, drop):
    graphs = Engine.load(engine_dir, device="cuda")
    eager = Engine.load(engine_dir, device="cuda", cuda_graphs=False)
    prompts, imgs = [PROMPT, "USER: hi ASSISTANT:"], [images[0], None]
    kw = dict(max_new_tokens=64, drop_ratio=drop)
    for g, e in zip(graphs.generate(prompts, imgs, **kw), eager.generate(prompts, imgs, **kw)):
        assert g.token_ids == e.token_ids and len(g.token_ids) == 64
    assert graphs.decoder.captures == 2  # batch buckets 1 (while the second prompt prefills) and 2


def test_requests_of_one_bucket_reuse_the_graph(engine_dir, images):
    engine = Engine.load(engine_dir, device="cuda")
    first = engine.generate([PROMPT], [images[0]], max_new_tokens=20)[0]
    for image in images[1:4]:  # other prompts lengths, same (batch 1, 512-token) bucket
        engine.generate([PROMPT], [image], max_new_tokens=20)
    assert engine.decoder.captures == 1
    assert engine.generate([PROMPT], [images[0]], max_new_tokens=20)[0].token_ids == first.token_ids


def test_cuda_inflight_batching_equals_one_at_a_time(engine_dir, images):
    """Requests joining between CUDA-graph decode steps (batch buckets change) give their solo answers."""
    engine = Engine.load(engine_dir, device="cuda")
    cases = [(PROMPT, images[i % 4], 6 + 3 * i, [0.0, 0.5, 0.75][i % 3]) for i in range(6)]
    events = {}
    with torch.inference_mode():
        for i, (prompt, image, n, drop) in enumerate(cases):
            req = engine.prepare(prompt, image, SamplingParams(max_new_tokens=n), drop)
            engine.submit(req, lambda e, i=i: events.setdefault(i, []).append(e), i)
            engine.scheduler.step()  # one arrival per step
        while not engine.scheduler.idle():
            engine.scheduler.step()
    for i, (prompt, image, n, drop) in enumerate(cases):
        [got] = [e.result for e in events[i] if e.result is not None]
        assert got.token_ids == engine.generate([prompt], [image], max_new_tokens=n, drop_ratio=drop)[0].token_ids
    assert engine.pool.n_free == engine.pool.num_blocks
