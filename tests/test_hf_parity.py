"""With nothing dropped, our engine equals transformers' LlavaNextForConditionalGeneration (fp32)."""
from __future__ import annotations

import pytest
import torch
from conftest import prefill
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

from builder.runtime.engine import Engine
from builder.runtime.sampling import SamplingParams

PROMPTS = ["<image>\nWhat is in the picture? ASSISTANT:",
           "USER: describe <image> briefly ASSISTANT:",
           "A chat. USER: <image>\nHow many shapes? ASSISTANT:"]


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return LlavaNextForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_processor(hf_dir):
    return AutoProcessor.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def engine_no_drop(engine_dir):
    return Engine.load(engine_dir, device="cpu")


def our_logits(engine, prompt, image):
    """Logits at every prompt position from our prefill (drop 0)."""
    req = engine.prepare(prompt, image, SamplingParams(), drop_ratio=0.0)
    _, h, _ = prefill(engine, req)
    with torch.inference_mode():
        return engine.llm.output(h)[0], req


@pytest.mark.parametrize("case", range(6))
def test_prefill_logits_match_hf(case, engine_no_drop, hf_model, hf_processor, images):
    prompt, image = PROMPTS[case % len(PROMPTS)], images[case]
    ours, req = our_logits(engine_no_drop, prompt, image)
    enc = hf_processor(text=prompt, images=image, return_tensors="pt")
    assert torch.equal(enc.input_ids[0], req.input_ids)
    with torch.no_grad():
        theirs = hf_model(**enc).logits[0]
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_text_only_logits_match_hf(engine_no_drop, hf_model, hf_processor):
    ours, req = our_logits(engine_no_drop, "USER: hello there ASSISTANT:", None)
    with torch.no_grad():
        theirs = hf_model(input_ids=req.input_ids[None]).logits[0]
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", [0, 3, 4])
def test_greedy_generation_matches_hf(case, engine_no_drop, hf_model, hf_processor, images):
    prompt, image = PROMPTS[case % len(PROMPTS)], images[case]
    [result] = engine_no_drop.generate([prompt], [image], max_new_tokens=12, drop_ratio=0.0)
    enc = hf_processor(text=prompt, images=image, return_tensors="pt")
    with torch.no_grad():
        out = hf_model.generate(**enc, max_new_tokens=12, do_sample=False)
    theirs = out[0, enc.input_ids.shape[1]:].tolist()
    assert result.token_ids == theirs[:len(result.token_ids)]
    assert len(result.token_ids) == 12 or result.token_ids[-1] in engine_no_drop.manifest.eos_token_ids


def test_vision_features_match_hf(engine_no_drop, hf_model, hf_processor, images):
    for image in images[:3]:
        enc = hf_processor(text="<image>", images=image, return_tensors="pt")
        with torch.no_grad():
            theirs = hf_model.model.get_image_features(enc.pixel_values, enc.image_sizes).pooler_output[0]
            ours, _ = engine_no_drop.vision(enc.pixel_values[0], tuple(enc.image_sizes[0].tolist()))
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() <= 1e-5
