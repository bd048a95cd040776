"""The converter: HF layouts of both transformers generations, the manifest, atomic writes."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import DEMO_LAYERS, make_image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from builder.convert.build import build_engine
from builder.convert.checkpoint import open_checkpoint
from builder.format.config import Limits, PyramidSchedule
from builder.format.errors import CheckpointError, EngineError
from builder.format.manifest import FORMAT_VERSION, read_manifest, sha256_file
from builder.network import precision
from builder.runtime.engine import Engine

LIMITS = Limits(4, 1536, 2048)


def build(ckpt, path, drop=0.5, dtype="auto"):
    return build_engine(ckpt, path, PyramidSchedule.create(8, drop, DEMO_LAYERS), LIMITS, dtype, progress=False)


def tensors(path):
    return load_file(path / "llm.safetensors") | {"v." + k: v for k, v in load_file(path / "vision.safetensors").items()}


def assert_same_tensors(a, b):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_manifest_records_everything_the_runtime_needs(engine_dir, demo_ckpt):
    m = read_manifest(engine_dir)
    raw = json.loads((engine_dir / "manifest.json").read_text())
    assert raw["format_version"] == FORMAT_VERSION and raw["builder_version"]
    assert m.pyramid.layers == DEMO_LAYERS and m.pyramid.drop_ratio == 0.5
    assert m.dtype == m.precision == "float32" and m.limits == Limits(8, 1536, 2048)
    assert m.llm.n_layers == 8 and m.llm.n_kv_heads == 2
    assert m.source == {"checkpoint": "preset:demo", "fingerprint": "preset:demo:seed=0"}
    assert m.eos_token_ids == [demo_ckpt.processor.tokenizer.eos_token_id]
    for name in ("llm.safetensors", "vision.safetensors", "tokenizer.json", "processor_config.json"):
        assert m.files[name] == sha256_file(engine_dir / name)


def test_weights_are_fused_in_out_in_layout(engine_dir, demo_ckpt):
    llm = load_file(engine_dir / "llm.safetensors")
    src = "language_model.layers.3."
    qkv = torch.cat([demo_ckpt.load(src + f"self_attn.{p}_proj.weight") for p in "qkv"])
    gate_up = torch.cat([demo_ckpt.load(src + f"mlp.{p}_proj.weight") for p in ("gate", "up")])
    assert torch.equal(llm["layers.3.attention.wqkv.weight"], qkv)
    assert torch.equal(llm["layers.3.feed_forward.w13.weight"], gate_up)
    assert llm["layers.3.attention.wqkv.weight"].shape == (128 + 2 * 64, 128)


def test_hf_directory_builds_the_same_engine_as_the_preset(hf_dir, engine_dir, tmp_path):
    ckpt = open_checkpoint(hf_dir)
    assert ckpt.fingerprint.startswith("sha256:")
    build(ckpt, tmp_path / "e")
    assert_same_tensors(tmp_path / "e", engine_dir)


def to_transformers4_name(name: str) -> str:
    """transformers 5.x names back to the 4.x layout real llava-hf checkpoints were saved in."""
    if name == "lm_head.weight":
        return "language_model.lm_head.weight"
    name = name.removeprefix("model.")
    name = name.replace("language_model.", "language_model.model.", 1)
    return name.replace("vision_tower.", "vision_tower.vision_model.", 1)


def test_transformers4_sharded_layout_builds_the_same_engine(hf_dir, engine_dir, tmp_path):
    src = tmp_path / "v4"
    src.mkdir()
    for f in hf_dir.iterdir():
        if f.suffix != ".safetensors":
            (src / f.name).write_bytes(f.read_bytes())
    weights = {to_transformers4_name(k): v for k, v in load_file(hf_dir / "model.safetensors").items()}
    names = sorted(weights)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: weights[k] for k in keys}, src / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    build(open_checkpoint(src), tmp_path / "e")
    assert_same_tensors(tmp_path / "e", engine_dir)


def test_missing_tensor_is_refused_by_name(hf_dir, tmp_path):
    src = tmp_path / "partial"
    src.mkdir()
    for f in hf_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    weights = load_file(src / "model.safetensors")
    del weights["model.language_model.layers.5.mlp.up_proj.weight"]
    save_file(weights, src / "model.safetensors")
    with pytest.raises(CheckpointError, match="lacks 1 tensors, e.g. language_model.layers.5.mlp.up_proj.weight"):
        open_checkpoint(src)


def test_failed_build_leaves_nothing(demo_ckpt, tmp_path):
    from dataclasses import replace

    def load(name):
        if name.startswith("language_model.layers.6"):
            raise CheckpointError("simulated read failure")
        return demo_ckpt.load(name)

    with pytest.raises(CheckpointError, match="simulated"):
        build(replace(demo_ckpt, load=load), tmp_path / "e")
    assert list(tmp_path.iterdir()) == []


def test_bfloat16_engine_loads_and_generates(demo_ckpt, tmp_path, monkeypatch):
    build(demo_ckpt, tmp_path / "bf16", dtype="bfloat16")
    with safe_open(tmp_path / "bf16" / "llm.safetensors", "pt") as f:
        assert f.get_tensor("norm.weight").dtype == torch.bfloat16
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)  # asked for at build: bf16 on any CPU
    engine = Engine.load(tmp_path / "bf16", device="cpu")
    assert engine.dtype == engine.pool.k.dtype == torch.bfloat16
    assert Engine.load(tmp_path / "bf16", device="cpu", dtype="float32").pool.k.dtype == torch.float32
    [r] = engine.generate(["<image>\nWhat? ASSISTANT:"], [make_image(100, 150)], max_new_tokens=5)
    assert len(r.token_ids) == 5 and [s.tokens_kept for s in r.stages] == [84, 42, 21]


def test_tampered_engine_is_refused(engine_dir, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in engine_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    data = bytearray((copy / "vision.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "vision.safetensors").write_bytes(bytes(data))
    with pytest.raises(EngineError, match="checksum mismatch"):
        Engine.load(copy)
