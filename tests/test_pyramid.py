"""With dropping, the engine's fast path (KV cache, compaction) equals the plain reference of the rule."""
from __future__ import annotations

import pytest
import torch
from conftest import DEMO_LAYERS, prefilled
from reference import Reference, authors_count

from builder.format.config import LLMConfig, PyramidSchedule
from builder.network.flops import paper_flops
from builder.network.pyramid import select
from builder.runtime.sampling import SamplingParams

PROMPT = "USER: <image>\nWhich shape is red? ASSISTANT:"


@pytest.fixture(scope="module")
def reference(demo_ckpt):
    return Reference(demo_ckpt)


def fast_path(engine, prompt, image, drop, steps, **variant):
    """Greedy tokens, per-step logits and stage stats from the engine's cached prefill + decode."""
    schedule = PyramidSchedule.create(8, drop, DEMO_LAYERS, **variant)
    req = engine.prepare(prompt, image, SamplingParams(max_new_tokens=steps), schedule=schedule)
    with prefilled(engine, req) as (embeds, h, stages, seq), torch.inference_mode():
        logits = [engine.llm.output(h[0, -1])]
        tokens = [int(logits[-1].argmax())]
        for _ in range(steps - 1):
            logits.append(engine.decoder.step(torch.tensor(tokens[-1:]), [seq])[0])
            tokens.append(int(logits[-1].argmax()))
    return req, embeds[0], tokens, logits, stages, seq.lengths


@pytest.mark.parametrize("drop,case", [(0.5, 0), (0.5, 3), (0.25, 1), (0.75, 4), (0.5, 5)])
def test_prefill_and_decode_match_reference(drop, case, engine, reference, images):
    steps = 6
    req, embeds, tokens, logits, stages, _ = fast_path(engine, PROMPT, images[case], drop, steps)
    keep = 1 - drop
    assert [s.tokens_kept for s in stages] == [authors_count(req.n_image, keep, s) for s in range(3)]
    seq = embeds
    for step in range(steps):
        ref_logits, ref_kept = reference.forward(seq, req.input_ids.numel(), req.image_start, req.n_image,
                                                 DEMO_LAYERS, keep)
        assert ref_kept == [s.kept for s in stages]
        assert (logits[step] - ref_logits).abs().max().item() <= 1e-4, f"step {step}"
        seq = torch.cat((seq, engine.llm.tok_embeddings.weight[tokens[step]][None]))


@pytest.mark.parametrize("variant", [dict(positions="original"), dict(method="random", seed=3),
                                     dict(method="random", positions="original")])
def test_baselines_match_the_reference(variant, engine, reference, images):
    """The comparison baselines (FastV-style original positions, random keep) run through the same
    cache and decode path and equal the reference of the same variant."""
    steps = 5
    req, embeds, tokens, logits, stages, _ = fast_path(engine, PROMPT, images[0], 0.5, steps, **variant)
    seq = embeds
    for step in range(steps):
        ref_logits, ref_kept = reference.forward(seq, req.input_ids.numel(), req.image_start, req.n_image,
                                                 DEMO_LAYERS, 0.5, **variant)
        assert ref_kept == [s.kept for s in stages]
        assert (logits[step] - ref_logits).abs().max().item() <= 1e-4, f"step {step}"
        seq = torch.cat((seq, engine.llm.tok_embeddings.weight[tokens[step]][None]))


def test_drop_changes_the_computation(engine, images):
    """Sanity: dropping really removes tokens, and the deepest layers' caches are shorter."""
    req, _, _, _, stages, lengths = fast_path(engine, PROMPT, images[0], 0.5, 2)
    prompt = req.input_ids.numel()
    n = req.n_image
    expected = [prompt + 1 - (n - c) for c in PyramidSchedule(DEMO_LAYERS, 0.5).tokens_per_layer(n, 8)]
    assert lengths == expected
    assert lengths[0] > lengths[2] > lengths[4] > lengths[6]


def test_batch_equals_one_at_a_time(engine, images):
    prompts = [PROMPT, "<image>\nDescribe it. ASSISTANT:", "USER: no image here ASSISTANT:", PROMPT]
    imgs = [images[0], images[4], None, images[2]]
    batch = engine.generate(prompts, imgs, max_new_tokens=8, drop_ratio=0.5)
    for p, im, b in zip(prompts, imgs, batch):
        [single] = engine.generate([p], [im], max_new_tokens=8, drop_ratio=0.5)
        assert b.token_ids == single.token_ids
        assert [s.kept for s in b.stages] == [s.kept for s in single.stages]
    assert batch[2].stages == [] and batch[2].image_tokens == 0
    assert len({b.image_tokens for b in batch if b.image_tokens}) == 3  # ragged: three different counts


def test_batch_with_different_lengths_and_budgets(engine, images):
    """The longest prompt asks for the fewest tokens: it keeps stepping while the others finish."""
    from builder.runtime.sampling import SamplingParams

    prompts, imgs = [PROMPT, "USER: hi ASSISTANT:"], [images[2], None]
    params = [SamplingParams(max_new_tokens=2), SamplingParams(max_new_tokens=9)]
    batch = engine.generate(prompts, imgs, params=params)
    assert [len(r.token_ids) for r in batch] == [2, 9]
    for p, im, sp, b in zip(prompts, imgs, params, batch):
        assert b.token_ids == engine.generate([p], [im], params=[sp])[0].token_ids


def test_per_request_drop_ratio_in_one_batch(engine, images):
    a, b = engine.generate([PROMPT, PROMPT], [images[0], images[0]], max_new_tokens=4, drop_ratio=[0.0, 0.5])
    assert [s.tokens_kept for s in a.stages] == [a.image_tokens] * 3
    assert [s.tokens_kept for s in b.stages] == [int(b.image_tokens * 0.5 ** k) for k in (1, 2, 3)]


def test_select_ties_go_to_lower_index_in_original_order():
    scores = torch.tensor([0.1, 0.5, 0.5, 0.2, 0.5, 0.0])
    assert select(scores, 2).tolist() == [1, 2]
    assert select(scores, 4).tolist() == [1, 2, 3, 4]
    assert select(scores, 0).tolist() == []
    assert select(scores, 6).tolist() == [0, 1, 2, 3, 4, 5]


def test_schedule_counts_follow_the_authors_floor_of_original_n():
    s = PyramidSchedule.create(32, 0.5)
    assert s.layers == [8, 16, 24]
    assert [s.kept_after(576, k) for k in range(3)] == [288, 144, 72]
    assert [s.kept_after(2340, k) for k in range(3)] == [1170, 585, 292]
    per_layer = s.tokens_per_layer(2880, 32)
    assert per_layer[:8] == [2880] * 8 and per_layer[8:16] == [1440] * 8 and per_layer[24:] == [360] * 8


@pytest.mark.parametrize("n,drop,stage,count", [
    (100, 0.3, 1, 49),  # 0.7**2 = 0.48999999999999994 in floating point: a float power gives 48
    (100, 0.3, 2, 34), (1000, 0.3, 2, 343), (100, 0.4, 1, 36), (2928, 0.5, 2, 366), (576, 0.5, 2, 72),
    (2340, 0.5, 2, 292), (2928, 0.25, 0, 2196), (2928, 0.75, 2, 45), (88, 0.5, 0, 44)])
def test_keep_counts_equal_the_authors_literal_ratios(n, drop, stage, count):
    assert PyramidSchedule.create(32, drop).kept_after(n, stage) == count


@pytest.mark.parametrize("keep", [0.7, 0.6, 0.75, 0.3, 0.9, 0.55])
def test_keep_counts_equal_the_authors_for_every_n(keep):
    schedule = PyramidSchedule.create(32, round(1 - keep, 12))
    assert all(schedule.kept_after(n, s) == authors_count(n, keep, s) for n in range(1, 3001) for s in range(4))


def test_paper_flops_reproduce_the_published_numbers():
    vicuna = LLMConfig(vocab_size=32064, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128,
                       intermediate_size=11008)
    s = PyramidSchedule.create(32, 0.5)
    assert paper_flops(vicuna, None, 576) / 1e12 == pytest.approx(3.82, abs=0.005)
    assert paper_flops(vicuna, s, 576) / 1e12 == pytest.approx(1.78, abs=0.005)
    assert paper_flops(vicuna, None, 2880) / 1e12 == pytest.approx(20.83, abs=0.005)
    assert paper_flops(vicuna, s, 2880) / 1e12 == pytest.approx(9.46, abs=0.005)
