"""The CUDA kernels against the torch reference of the same rule (`pytest -m gpu`, on a GPU)."""
from __future__ import annotations

import pytest
import torch
from conftest import CUDA_ARCH, CUDA_KERNELS_MISSING
from reference import paged_decode_reference, random_paged_batch

from builder.convert.plugins import compile_plugins
from builder.network import pyramid
from builder.runtime.engine import Engine
from builder.network.kernels import Kernels

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(CUDA_ARCH is None, reason="no CUDA device on this machine"),
              pytest.mark.skipif(CUDA_KERNELS_MISSING is not None, reason=str(CUDA_KERNELS_MISSING))]


@pytest.fixture(scope="module")
def kernels():
    return Kernels(compile_plugins([CUDA_ARCH], progress=False))


def ragged_batch(gen, n_seq, dtype, heads=32, kv=8, dim=128):
    """Random ragged sequences: text before, an image span of 0..3000 tokens, text after."""
    seqs = []
    for _ in range(n_seq):
        n = int(torch.randint(0, 3001, (1,), generator=gen))
        before, after = (int(x) for x in torch.randint(1, 40, (2,), generator=gen))
        seqs.append((before, n, before + n + after))
    q = torch.randn(n_seq, heads, dim, generator=gen).to("cuda", dtype)
    k = torch.randn(sum(s[2] for s in seqs), kv, dim, generator=gen).to("cuda", dtype)
    return q, k, seqs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", range(4))
def test_kernels_equal_the_torch_reference(kernels, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, seqs = ragged_batch(gen, 1 + seed * 2 + (dtype == torch.float32), dtype)
    lens, starts, ns = [s[2] for s in seqs], [s[0] for s in seqs], [s[1] for s in seqs]
    keep_ratios = [0.0, 1.0, 0.5, 0.25, 0.125, 0.9, 0.01, 0.75, 0.3]
    n_keeps = [int(n * keep_ratios[i % len(keep_ratios)]) for i, n in enumerate(ns)]

    scores = kernels.score(q, k, lens, starts, ns)
    kept = kernels.select(scores, ns, n_keeps)
    hidden = torch.randn(sum(lens), 4096, generator=gen).to("cuda", dtype)
    out = kernels.compact(hidden, lens, starts, ns, kept, n_keeps)
    torch.cuda.synchronize()

    off = img_off = kept_off = out_off = 0
    for b, (start, n, length) in enumerate(seqs):
        ref_scores = pyramid.attention(q[b], k[off:off + length])[start:start + n]
        mine = scores[img_off:img_off + n]
        torch.testing.assert_close(mine, ref_scores, rtol=1e-4, atol=1e-7)
        # selection is exact: the same indices as the reference rule on the same scores
        ref_kept = pyramid.select(mine, n_keeps[b])
        assert torch.equal(kept[kept_off:kept_off + n_keeps[b]].long(), ref_kept)
        rows = torch.cat((torch.arange(start), ref_kept.cpu() + start, torch.arange(start + n, length))).cuda()
        new_len = length - n + n_keeps[b]
        assert torch.equal(out[out_off:out_off + new_len], hidden[off:off + length][rows])  # bitwise
        off, img_off, kept_off, out_off = off + length, img_off + n, kept_off + n_keeps[b], out_off + new_len


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads, kv, dim, block_size", [(32, 8, 128, 16), (32, 32, 128, 16), (28, 4, 64, 7)])
def test_paged_decode_equals_the_plain_reference(kernels, dtype, heads, kv, dim, block_size):
    gen = torch.Generator().manual_seed(heads + dim + block_size)
    batch = [t.cuda() for t in random_paged_batch(gen, 6, heads, kv, dim, block_size, dtype, max_keys=3000)]
    got = kernels.paged_decode(*batch)
    want = paged_decode_reference(*batch)
    assert got.dtype == dtype and (got.float().cpu() - want).abs().max().item() < (1e-4 if dtype == torch.float32 else 2e-2)


def test_paged_decode_replays_in_a_cuda_graph_with_new_tables_and_lengths(kernels):
    """The launch depends only on the shapes: captured once, replayed over other tables and lengths."""
    gen = torch.Generator().manual_seed(5)
    q, k_pool, v_pool, tables, num_keys = (t.cuda() for t in random_paged_batch(gen, 4, 32, 8, 128, 16, torch.bfloat16))
    kernels.paged_decode(q, k_pool, v_pool, tables, num_keys)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels.paged_decode(q, k_pool, v_pool, tables, num_keys)
    q.copy_(torch.randn(q.shape, generator=gen).to(q))
    tables.copy_(tables.flip(0).roll(1, dims=1))
    num_keys.copy_(torch.tensor([1, 0, 700, tables.shape[1] * 16]))
    graph.replay()
    want = paged_decode_reference(q, k_pool, v_pool, tables, num_keys)
    assert (out.float().cpu() - want).abs().max().item() < 2e-2


def test_select_ties_go_to_the_lower_index(kernels):
    scores = torch.tensor([0.1, 0.5, 0.5, 0.2, 0.5, 0.0, 0.5], device="cuda")
    for n_keep in range(8):
        assert kernels.select(scores, [7], [n_keep]).tolist() == pyramid.select(scores, n_keep).tolist()


def test_engine_greedy_with_kernels_equals_torch_ops(engine_dir, demo_ckpt, images, tmp_path):
    from builder.convert.build import build_engine
    from builder.format.config import Limits, PyramidSchedule

    build_engine(demo_ckpt, tmp_path / "e", PyramidSchedule.create(8, 0.5, [2, 4, 6]), Limits(4, 1536, 2048),
                 progress=False, plugins="on", cuda_archs=[CUDA_ARCH])
    fast = Engine.load(tmp_path / "e", device="cuda")
    assert fast.llm.kernels is not None and fast.llm.layers[0].attention.kv_cache.kernels is fast.llm.kernels
    plain = Engine.load(tmp_path / "e", device="cuda")
    plain.llm.kernels = None  # the drop on torch ops, and decode attention too:
    for layer in plain.llm.layers:
        layer.attention.kv_cache.kernels = None
    prompts = ["USER: <image>\nWhat? ASSISTANT:"] * 3
    imgs = images[:3]
    for a, b in zip(fast.generate(prompts, imgs, max_new_tokens=16), plain.generate(prompts, imgs, max_new_tokens=16)):
        assert a.token_ids == b.token_ids
        assert [s.kept for s in a.stages] == [s.kept for s in b.stages]
