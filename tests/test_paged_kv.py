"""The paged KV cache: first-fit allocation, and decode attention that reads each row's blocks in
place (the engine's kernel), scattered or in one run, or gathers them (torch ops): one answer."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from conftest import prefilled

from builder.runtime.paged_kv import BlockPool, DecodeBatch, SequenceKV
from builder.runtime.sampling import SamplingParams

PROMPT = "USER: <image>\nWhich shape is red? ASSISTANT:"


def test_allocation_takes_the_first_hole_that_fits_else_the_lowest_free_blocks():
    pool = BlockPool(20, 4, 1, 2, torch.float32, torch.device("cpu"))
    a, b, c = pool.allocate(5), pool.allocate(5), pool.allocate(5)
    assert (a, b, c) == ([1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15])
    pool.release(b)
    assert pool.allocate(6) == [6, 7, 8, 9, 10, 16]  # no hole of 6: the lowest free, scattered
    pool.release([6, 7, 8, 9, 10, 16])
    assert pool.allocate(4) == [6, 7, 8, 9]  # the first hole that fits
    assert pool.allocate(5) == [16, 17, 18, 19, 20]  # the hole of 1 left at 10 is too small
    assert pool.n_free == 1
    seq = SequenceKV.of([3, 4, 9, 5, 6, 7], [2, 1, 3])
    assert seq.tables.tolist() == [[3, 4, 0], [9, 0, 0], [5, 6, 7]] and seq.n_blocks == [2, 1, 3]


@contextmanager
def torch_ops(engine):
    """Decode attention on torch ops (blocks gathered) instead of the engine's kernel, for a while."""
    caches = [layer.attention.kv_cache for layer in engine.llm.layers]
    for cache in caches:
        cache.kernels = None
    try:
        yield
    finally:
        for cache in caches:
            cache.kernels = engine.llm.decode_kernels


def test_decode_kernel_reads_scattered_and_consecutive_blocks_as_torch_ops_do(engine, images):
    """One sequence's blocks scattered over holes, one's in a run: the kernel reading them in place
    and torch ops gathering them give the same logits, batched or alone."""
    assert engine.llm.decode_kernels is not None  # the CPU kernel, built into the test engine
    pool, params = engine.pool, SamplingParams(max_new_tokens=4)
    reqs = [engine.prepare(PROMPT, images[0], params), engine.prepare("USER: hi ASSISTANT:", None, params)]
    with prefilled(engine, reqs[1]) as (*_, run), torch.inference_mode():
        pieces = [pool.allocate(3) for _ in range(pool.n_free // 3)]
        for p in pieces[::2]:
            pool.release(p)  # only holes of 3 blocks are left: the next sequence's blocks scatter
        with prefilled(engine, reqs[0]) as (*_, scattered):
            assert (scattered.tables[0, 1:scattered.n_blocks[0]].diff() != 1).any()
            assert (run.tables[0, 1:run.n_blocks[0]].diff() == 1).all()
            tokens = torch.tensor([5, 7])
            batch = DecodeBatch.of([scattered, run], 2, engine.device)
            kernel = engine.llm.decode(tokens, batch)
            with torch_ops(engine):
                gathered = engine.llm.decode(tokens, batch)
            alone = engine.llm.decode(tokens[1:], DecodeBatch.of([run], 1, engine.device))
        for p in pieces[1::2]:
            pool.release(p)
    assert (kernel - gathered).abs().max().item() < 1e-5
    assert (kernel[1] - alone[0]).abs().max().item() < 1e-5
    assert engine.stats()["kv_blocks_free"] == pool.num_blocks  # the prefix cache's entries count as free


def test_each_layer_reads_only_the_blocks_it_holds(engine, images):
    """A step's layer i table is as wide as what layer i holds, so deep stages read less at drop 0.5;
    padded wider with padding rows (CUDA-graph buckets), the logits do not change, kernel or torch ops."""
    req = engine.prepare(PROMPT, images[0], SamplingParams(max_new_tokens=4), drop_ratio=0.5)
    with prefilled(engine, req) as (*_, seq), torch.inference_mode():
        batch = DecodeBatch.of([seq], 1, engine.device)
        assert [t.shape[1] for t in batch.tables] == seq.n_blocks
        assert seq.n_blocks[-1] < seq.n_blocks[0] / 2
        tokens = torch.tensor([5])
        exact = engine.llm.decode(tokens, batch)
        wide = DecodeBatch.of([seq], 2, engine.device, [n + 3 for n in seq.n_blocks])
        padded = engine.llm.decode(torch.tensor([5, 0]), wide)
        with torch_ops(engine):
            gathered = engine.llm.decode(tokens, batch)
            gathered_padded = engine.llm.decode(torch.tensor([5, 0]), wide)
    for other in (padded[:1], gathered, gathered_padded[:1]):
        assert (exact - other).abs().max().item() < 1e-5
