"""The paged KV cache: first-fit allocation, and decode attention that reads a row's blocks in place,
copies them when they are scattered, or gathers padded tables (CUDA graphs): one answer."""
from __future__ import annotations

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
    assert seq.runs == [3, 9, 5] and SequenceKV.of([4, 3, 9], [2, 1]).runs == [None, 9]


def test_decode_reads_in_place_copied_and_gathered_alike(engine, images):
    """One sequence's blocks scattered over holes, one's in a run: the per-row in-place step (the
    scattered row copied out), and the padded gather a CUDA graph runs, give the same logits."""
    pool, params = engine.pool, SamplingParams(max_new_tokens=4)
    reqs = [engine.prepare(PROMPT, images[0], params), engine.prepare("USER: hi ASSISTANT:", None, params)]
    with prefilled(engine, reqs[1]) as (*_, run), torch.inference_mode():
        pieces = [pool.allocate(3) for _ in range(pool.n_free // 3)]
        for p in pieces[::2]:
            pool.release(p)  # only holes of 3 blocks are left: the next sequence's blocks scatter
        with prefilled(engine, reqs[0]) as (*_, scattered):
            assert None in scattered.runs and None not in run.runs
            tokens = torch.tensor([5, 7])
            logits = [engine.llm.decode(tokens, DecodeBatch.of([scattered, run], 2, engine.device, in_place=p))
                      for p in (True, False)]
            alone = engine.llm.decode(tokens[1:], DecodeBatch.of([run], 1, engine.device))
        for p in pieces[1::2]:
            pool.release(p)
    assert (logits[0] - logits[1]).abs().max().item() < 1e-5
    assert (logits[0][1] - alone[0]).abs().max().item() < 1e-5
    assert pool.n_free == pool.num_blocks


def test_each_layer_gathers_only_the_blocks_it_holds(engine, images):
    """The gathered (CUDA-graph) step pads layer i's table to what layer i holds, so deep stages read
    less at drop 0.5; padded wider still (graph buckets), the logits do not change."""
    req = engine.prepare(PROMPT, images[0], SamplingParams(max_new_tokens=4), drop_ratio=0.5)
    with prefilled(engine, req) as (*_, seq), torch.inference_mode():
        batch = DecodeBatch.of([seq], 1, engine.device, in_place=False)
        assert [t.shape[1] for t in batch.tables] == seq.n_blocks
        assert seq.n_blocks[-1] < seq.n_blocks[0] / 2
        tokens = torch.tensor([5])
        exact = engine.llm.decode(tokens, batch)
        padded = engine.llm.decode(tokens, DecodeBatch.of([seq], 2, engine.device, [n + 3 for n in seq.n_blocks],
                                                          in_place=False))
        in_place = engine.llm.decode(tokens, DecodeBatch.of([seq], 1, engine.device))
    assert (exact - padded[:1]).abs().max().item() < 1e-5 and (exact - in_place).abs().max().item() < 1e-5
