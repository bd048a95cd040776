"""The decode step as a CUDA graph would capture it (GraphDecoder), emulated on the CPU (recorder):
nothing in it syncs, draws random numbers or reads a tensor from outside its inputs, and the recorded
ops replayed into the step's input tensors, after they were overwritten with another batch (a
sequence evicted, its blocks reused), give what an eager step on that batch gives."""
from __future__ import annotations

import functools

import pytest
import torch
from conftest import _build, allocate, prefill_into
from recorder import Recorder

from builder.runtime.decode import Decoder, padded
from builder.runtime.engine import Engine
from builder.network.kernels import CpuKernels
from builder.runtime.paged_kv import SequenceKV
from builder.runtime.sampling import SamplingParams

ROWS = 4  # three sequences and a padding row


@pytest.fixture(scope="module")
def engines(demo_ckpt, engine_dir, tmp_path_factory):
    """float32 (tight tolerances on any CPU): the engine's CPU kernels, and an engine built without them."""
    plain = _build(demo_ckpt, tmp_path_factory.mktemp("plain") / "demo", 0.5, cpu_kernels="off")
    with pytest.warns(UserWarning, match="no CPU kernels"):
        torch_ops = Engine.load(plain, device="cpu", dtype="float32", kv_cache_tokens=4096)
    kernels = Engine.load(engine_dir, device="cpu", dtype="float32", kv_cache_tokens=4096)
    lib = kernels.llm.decode_kernels
    assert isinstance(lib, CpuKernels) and torch_ops.llm.decode_kernels is None
    # called eagerly, the kernels are ctypes calls that no dispatch mode sees (a graph would capture
    # their launches): here they go through their custom ops, as in a compiled step, to be recorded
    lib.paged_decode = functools.partial(torch.ops.pdrop.paged_decode, lib.path)
    lib.linear = functools.partial(torch.ops.pdrop.linear, lib.path)
    return {"kernels": kernels, "torch ops": torch_ops}


@pytest.fixture
def live():
    """(engine, sequence) pairs whose blocks go back to the engine's pool after the test."""
    held: list[tuple[Engine, SequenceKV]] = []
    yield held
    with torch.inference_mode():
        for engine, seq in held:
            engine.pool.release(seq.block_ids())


def admit(engine: Engine, req, live: list) -> SequenceKV:
    """`req` prefilled into newly allocated blocks."""
    seq = allocate(engine, req)
    live.append((engine, seq))
    prefill_into(engine, req, seq)
    return seq


def evict(engine: Engine, seq: SequenceKV, live: list) -> list[int]:
    """Release `seq`'s blocks now; returns their ids."""
    live[:] = [held for held in live if held[1] is not seq]
    engine.pool.release(seq.block_ids())
    return seq.block_ids()


@pytest.mark.parametrize("drop", [0.0, 0.5])
@pytest.mark.parametrize("attention", ["kernels", "torch ops"])
@torch.inference_mode()
def test_a_recorded_step_replays_after_eviction_as_an_eager_step(engines, images, live, attention, drop):
    engine = engines[attention]
    pool, decoder, params = engine.pool, Decoder(engine.llm), SamplingParams(max_new_tokens=8)
    prompts = {"a": ("USER: <image>\nWhich shape is red? ASSISTANT:", images[0]),
               "b": ("USER: <image>\nWhat is this? ASSISTANT:", images[2]),
               "c": ("USER: hi ASSISTANT:", None),
               "d": ("USER: <image>\nAnd here? ASSISTANT:", images[1])}
    reqs = {k: engine.prepare(prompt, image, params, drop_ratio=drop) for k, (prompt, image) in prompts.items()}
    a, b, c = (admit(engine, reqs[k], live) for k in "abc")
    # one width per layer for both batches (a graph's shapes are fixed): the most either holds
    widths = [max(col) for col in zip(a.n_blocks, b.n_blocks, c.n_blocks, engine.scheduler.blocks_for(reqs["d"]))]
    assert (len(set(widths)) > 1) == (drop > 0)  # the drop's deep stages hold fewer blocks
    tokens, batch = padded(torch.tensor([11, 12, 13]), [a, b, c], ROWS, widths)
    with Recorder() as rec:
        logits = decoder.forward(tokens, batch)

    assert rec.hazards() == []
    assert rec.foreign([*engine.llm.parameters(), *engine.llm.buffers(), pool.k, pool.v,
                        tokens, batch.flat, *batch.tables, batch.lengths, batch.offsets]) == []
    kernel_calls = [op.func.name() for op in rec.ops if op.func.namespace == "pdrop"]
    n_layers = len(engine.llm.layers)
    if attention == "kernels":  # the attention and the four linears of each layer, and the head
        assert kernel_calls.count("pdrop::paged_decode") == n_layers
        assert kernel_calls.count("pdrop::linear") == 4 * n_layers + 1
    else:
        assert kernel_calls == []

    for s in (a, c):  # as Decoder.step's bookkeeping: the step grew them
        s.lengths = [n + 1 for n in s.lengths]
    freed = evict(engine, b, live)
    d = admit(engine, reqs["d"], live)
    assert set(d.block_ids()) <= set(freed)  # first fit: d's blocks are b's
    new_tokens, new_batch = padded(torch.tensor([21, 22, 23]), [c, d, a], ROWS, widths)
    for mine, theirs in ((tokens, new_tokens), (batch.flat, new_batch.flat), (batch.lengths, new_batch.lengths),
                         (batch.offsets, new_batch.offsets)):
        mine.copy_(theirs)  # as GraphDecoder does before a replay

    before = pool.k.clone(), pool.v.clone()
    replayed = rec.replay()[id(logits)]
    after = pool.k.clone(), pool.v.clone()
    pool.k.copy_(before[0])
    pool.v.copy_(before[1])
    eager = decoder.forward(new_tokens, new_batch)
    torch.testing.assert_close(replayed, eager, rtol=1e-6, atol=1e-6)
    # the same KV writes: each row's new token at its own length (blocks never handed out may hold NaN)
    torch.testing.assert_close(after, (pool.k, pool.v), rtol=0, atol=0, equal_nan=True)
    assert not torch.allclose(eager, logits, atol=1e-2)  # and the new batch is another step
