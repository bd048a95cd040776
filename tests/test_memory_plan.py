"""The GPU memory plan: its arithmetic, and the profiling pass it measures (run here on a CPU, where
only the measuring needs a GPU; tests/test_gpu.py checks the plan on one)."""
from __future__ import annotations

import math

import pytest
import torch

from builder.format.errors import EngineError, InputError
from builder.runtime.engine import Engine
from builder.runtime.memory_plan import GiB, MemoryPlan, largest_work
from builder.runtime.paged_kv import BlockPool
from builder.network.vision import largest_image_tokens

KiB = 1024


def test_the_pool_is_a_fraction_of_what_the_weights_and_the_peaks_leave():
    plan = MemoryPlan.of(free=80 * GiB, prefill_peak=6 * GiB, decode_peak=2 * GiB, token_bytes=512 * KiB,
                         fraction=0.9, block_size=16, most_tokens=10**9, least_tokens=4096)
    assert plan.tokens == int(72 * GiB * 0.9) // (512 * KiB) // 16 * 16 == 132_704
    assert plan.pool_bytes <= 0.9 * 72 * GiB
    assert plan.describe() == ("80.0 GiB free after the weights, peaks 6.00 GiB prefill + 2.00 GiB decode; "
                               "KV pool 0.9 of the rest: 132704 tokens a layer, 64.8 GiB")
    # never more than max_batch_size sequences of max_seq_len can use
    capped = MemoryPlan.of(80 * GiB, 6 * GiB, 2 * GiB, 512 * KiB, 0.9, 16, most_tokens=8 * 4096, least_tokens=4096)
    assert capped.tokens == 8 * 4096


def test_a_gpu_too_small_for_one_sequence_is_one_clear_error():
    with pytest.raises(EngineError, match=r"^not enough GPU memory for the KV cache \(10\.0 GiB free after the "
                                          r"weights, peaks 9\.00 GiB prefill .* one sequence of max_seq_len needs "
                                          r"4096 tokens"):
        MemoryPlan.of(10 * GiB, 9 * GiB, 0, 512 * KiB, 0.9, 16, 10**9, 4096)


def test_the_largest_work_runs_on_a_scratch_pool_and_leaves_it_empty(engine_dir, images):
    """The profiling pass: the largest image through the vision tower, a max_input_len prefill through
    every stage with its drops, a max_batch_size decode step at the graphs' full table width."""
    engine = Engine.load(engine_dir, device="cpu")
    cfg, limits = engine.manifest.llm, engine.manifest.limits
    before = engine.generate(["USER: <image>\nWhat? ASSISTANT:"], [images[0]], max_new_tokens=6)[0]
    scratch = BlockPool(cfg.n_layers * math.ceil(limits.max_input_len / 16), 16, cfg.n_kv_heads, cfg.head_dim,
                        engine.dtype, engine.device)
    calls = []
    prefill, decode = engine.llm.prefill, engine.llm.decode
    engine.llm.prefill = lambda embeds, seq, span, schedule: (calls.append((embeds.shape[1], span.n_original)),
                                                              prefill(embeds, seq, span, schedule))[1]
    engine.llm.decode = lambda tokens, batch: (calls.append(tuple(t.shape for t in batch.tables)),
                                               decode(tokens, batch))[1]
    with torch.inference_mode():
        phases = list(largest_work(engine.llm, engine.vision, engine.manifest, scratch, 128))
    assert phases == ["prefill", "decode"]
    assert calls == [(limits.max_input_len, largest_image_tokens(engine.manifest.vision)),
                     ((limits.max_batch_size, 128),) * cfg.n_layers]
    assert scratch.n_free == scratch.num_blocks
    del engine.llm.prefill, engine.llm.decode
    engine.llm.attach(engine.pool)  # as Engine.__init__ does after planning
    after = engine.generate(["USER: <image>\nWhat? ASSISTANT:"], [images[0]], max_new_tokens=6)[0]
    assert after.token_ids == before.token_ids


def test_a_memory_fraction_needs_a_gpu(engine_dir):
    with pytest.raises(InputError, match="kv_cache_memory_fraction must be in \\(0, 1\\) and needs a CUDA device"):
        Engine.load(engine_dir, device="cpu", kv_cache_memory_fraction=0.5)
