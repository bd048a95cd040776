"""The same exactness checks on a CUDA device (`pytest -m gpu`); skipped where there is none."""
from __future__ import annotations

import pytest
import torch
from conftest import CUDA_ARCH, CUDA_KERNELS_MISSING, DEMO_LAYERS, _build, make_image, prefill
from reference import Reference

from builder.runtime.decode import batch_buckets
from builder.runtime.engine import Engine
from builder.runtime.sampling import SamplingParams
from builder.network.vision import largest_pinpoint

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]

PROMPT = "USER: <image>\nWhat is here? ASSISTANT:"


torch.backends.cuda.matmul.allow_tf32 = False  # fp32 exactness, not TF32


@pytest.fixture(scope="module")
def cuda_engine(engine_dir):
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


@pytest.fixture(scope="module")
def kernel_engine_dir(demo_ckpt, tmp_path_factory):
    """The demo engine with its CUDA kernels: what CUDA-graph decode needs."""
    if CUDA_KERNELS_MISSING:
        pytest.skip(CUDA_KERNELS_MISSING)
    return _build(demo_ckpt, tmp_path_factory.mktemp("kernels") / "demo", 0.5, plugins="on", cuda_archs=[CUDA_ARCH])


@pytest.mark.parametrize("drop", [0.0, 0.5])
def test_cuda_graph_decode_equals_eager_for_64_steps(kernel_engine_dir, images, drop):
    graphs = Engine.load(kernel_engine_dir, device="cuda")
    eager = Engine.load(kernel_engine_dir, device="cuda", cuda_graphs=False)
    assert graphs.decoder.captures == len(batch_buckets(8)) == 4  # 1, 2, 4, 8: all at load
    prompts, imgs = [PROMPT, "USER: hi ASSISTANT:"], [images[0], None]
    kw = dict(max_new_tokens=64, drop_ratio=drop)
    for g, e in zip(graphs.generate(prompts, imgs, **kw), eager.generate(prompts, imgs, **kw)):
        assert g.token_ids == e.token_ids and len(g.token_ids) == 64
    assert graphs.decoder.captures == 4  # none while serving


def test_the_memory_plan_holds_the_largest_work(kernel_engine_dir, images):
    """The pool is what the plan says; serving the largest image at the full batch allocates no more
    than the measured prefill peak (the decode graphs' memory was taken at load)."""
    engine = Engine.load(kernel_engine_dir, device="cuda")
    plan, cfg, pool = engine.plan, engine.manifest.llm, engine.pool
    assert plan is not None and plan.prefill_peak_bytes > 0 and plan.decode_peak_bytes > 0
    assert pool.num_blocks == cfg.n_layers * (plan.tokens // pool.block_size)
    assert plan.tokens <= 8 * 2048
    h, w = largest_pinpoint(engine.manifest.vision)
    torch.cuda.synchronize()
    at_load = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    results = engine.generate([PROMPT] * 8, [make_image(h, w, seed=i) for i in range(8)], max_new_tokens=8)
    assert all(len(r.token_ids) == 8 for r in results)
    assert torch.cuda.max_memory_allocated() - at_load <= plan.prefill_peak_bytes + (64 << 20)


def test_the_serving_thread_runs_on_the_engine_device(kernel_engine_dir, engine, images):
    """The scheduler's own thread binds the engine's device (the last one here): graphs replay there."""
    device = f"cuda:{torch.cuda.device_count() - 1}"
    served = Engine.load(kernel_engine_dir, device=device)
    served.start_serving()
    try:
        got = served.generate([PROMPT, PROMPT], [images[0], images[3]], max_new_tokens=12)
    finally:
        served.stop_serving()
    want = engine.generate([PROMPT, PROMPT], [images[0], images[3]], max_new_tokens=12)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]


def test_cuda_inflight_batching_equals_one_at_a_time(kernel_engine_dir, images):
    """Requests joining between CUDA-graph decode steps (batch buckets change) give their solo answers."""
    engine = Engine.load(kernel_engine_dir, device="cuda")
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
    assert engine.stats()["kv_blocks_free"] == engine.pool.num_blocks
