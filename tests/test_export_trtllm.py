"""`build --export trtllm-checkpoint` and `--backend tensorrt-llm`.

The checkpoint is checked against TensorRT-LLM's documented format written out here, not taken from
the exporter: names and shapes (docs/source/architecture/checkpoint.md, the Llama converter's
names), values against the Hugging Face source tensors, and a round trip back into our decoder.
TensorRT-LLM itself is not installed here: the backend must fail in one line and keep the engine.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch
from conftest import DEMO_LAYERS, make_image, prefill
from safetensors import safe_open

from builder.convert.presets import preset_checkpoint
from builder.export import trtllm_build
from builder.export.trtllm_build import build_llm_engine, build_vision_engine, trtexec_command, trtllm_build_command
from builder.export.trtllm_checkpoint import checkpoint_config, read_checkpoint
from builder.format.config import PyramidSchedule
from builder.format.errors import ExportError
from builder.format.manifest import read_manifest
from builder.runtime.engine import Engine
from builder.network.kernel_linear import use_kernel_linears
from builder.runtime.sampling import SamplingParams

HAS_TRTLLM = importlib.util.find_spec("tensorrt_llm") is not None


def expected_tensors(c: dict) -> dict[str, tuple[int, ...]]:
    """TensorRT-LLM's Llama checkpoint: every name and its (out, in) shape, from config.json alone."""
    h, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    q, kv = c["num_attention_heads"] * c["head_size"], c["num_key_value_heads"] * c["head_size"]
    table = {"transformer.vocab_embedding.weight": (vocab, h), "transformer.ln_f.weight": (h,),
             "lm_head.weight": (vocab, h)}
    for i in range(c["num_hidden_layers"]):
        p = f"transformer.layers.{i}."
        table |= {p + "input_layernorm.weight": (h,), p + "attention.qkv.weight": (q + 2 * kv, h),
                  p + "attention.dense.weight": (h, q), p + "post_layernorm.weight": (h,),
                  p + "mlp.fc.weight": (inter, h), p + "mlp.gate.weight": (inter, h), p + "mlp.proj.weight": (h, inter)}
    return table


@pytest.fixture(scope="module")
def ckpt_dir(exported_dir):
    return exported_dir / "trtllm-checkpoint"


@pytest.fixture(scope="module")
def config(ckpt_dir):
    return json.loads((ckpt_dir / "config.json").read_text())


def test_config_has_the_required_keys(config, demo_ckpt):
    text = demo_ckpt.hf_config.text_config
    assert config["architecture"] == "LlamaForCausalLM" and config["dtype"] == "float32"
    assert {k: config[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "intermediate_size", "max_position_embeddings")} == {
        "vocab_size": text.vocab_size, "hidden_size": text.hidden_size, "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads, "num_key_value_heads": text.num_key_value_heads,
        "intermediate_size": text.intermediate_size, "max_position_embeddings": text.max_position_embeddings}
    assert config["hidden_act"] == "silu" and config["norm_epsilon"] == text.rms_norm_eps
    assert config["position_embedding_type"] == "rope_gpt_neox" and config["rotary_base"] == 10000.0
    assert config["mapping"] == {"world_size": 1, "tp_size": 1, "pp_size": 1}
    assert config["quantization"] == {"quant_algo": None, "kv_cache_quant_algo": None}
    assert config["logits_dtype"] == "float32"
    assert config["pyramid_drop"] == {"layers": DEMO_LAYERS, "drop_ratio": 0.5, "method": "attention",
                                      "positions": "renumber", "seed": 0}


def test_mistral_is_named_mistral():
    ckpt = preset_checkpoint("llava-next-mistral-7b")
    c = checkpoint_config(ckpt.llm, ckpt.hf_config.text_config.model_type, "bfloat16",
                          PyramidSchedule.create(32, 0.5))
    assert (c["architecture"], c["num_key_value_heads"], c["rotary_base"]) == ("MistralForCausalLM", 8, 1e6)


def test_every_tensor_has_its_documented_name_shape_and_dtype(ckpt_dir, config):
    with safe_open(ckpt_dir / "rank0.safetensors", framework="pt") as f:
        got = {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype()) for name in f.keys()}
    assert got == {name: (shape, "F32") for name, shape in expected_tensors(config).items()}


def test_tensors_are_the_source_checkpoints(ckpt_dir, demo_ckpt):
    """mlp.fc is gate_proj (under the SiLU) and mlp.gate is up_proj, as TensorRT-LLM's Llama converter maps them."""
    with safe_open(ckpt_dir / "rank0.safetensors", framework="pt") as f:
        for i in (0, 7):
            src, dst = f"language_model.layers.{i}.", f"transformer.layers.{i}."
            pairs = {"attention.qkv": torch.cat([demo_ckpt.load(src + f"self_attn.{p}_proj.weight") for p in "qkv"]),
                     "attention.dense": demo_ckpt.load(src + "self_attn.o_proj.weight"),
                     "mlp.fc": demo_ckpt.load(src + "mlp.gate_proj.weight"),
                     "mlp.gate": demo_ckpt.load(src + "mlp.up_proj.weight"),
                     "mlp.proj": demo_ckpt.load(src + "mlp.down_proj.weight"),
                     "input_layernorm": demo_ckpt.load(src + "input_layernorm.weight"),
                     "post_layernorm": demo_ckpt.load(src + "post_attention_layernorm.weight")}
            for name, want in pairs.items():
                assert torch.equal(f.get_tensor(dst + name + ".weight"), want), name
        assert torch.equal(f.get_tensor("transformer.vocab_embedding.weight"),
                           demo_ckpt.load("language_model.embed_tokens.weight"))
        assert torch.equal(f.get_tensor("lm_head.weight"), demo_ckpt.load("lm_head.weight"))
        assert torch.equal(f.get_tensor("transformer.ln_f.weight"), demo_ckpt.load("language_model.norm.weight"))


def test_round_trip_gives_identical_logits(exported_dir, ckpt_dir):
    engine = Engine.load(exported_dir, device="cpu")
    imported = use_kernel_linears(read_checkpoint(ckpt_dir, engine.manifest.limits.max_seq_len),
                                  engine.llm.decode_kernels)  # run as the engine runs
    ours, theirs = engine.llm.state_dict(), imported.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(t, ours[k]) for k, t in theirs.items())
    req = engine.prepare("USER: <image>\nWhat is here? ASSISTANT:", make_image(100, 150, 1), SamplingParams(),
                         drop_ratio=0.5)
    with torch.inference_mode():
        _, h, stages = prefill(engine, req)
        want = engine.llm.output(h)
        engine.llm = imported  # embeddings, every layer, the drop's scoring and the head from the checkpoint
        _, h2, stages2 = prefill(engine, req)
        got = imported.output(h2)
    assert [s.kept for s in stages2] == [s.kept for s in stages] and len(stages) == 3
    assert torch.equal(got, want)


def test_trtllm_build_flags_follow_the_engine_limits(exported_dir, tmp_path):
    manifest = read_manifest(exported_dir)
    engine = Engine.load(exported_dir, device="cpu")
    # the largest anyres image (a 224 x 224 pinpoint) as the processor counts its tokens
    largest = engine.prepare("<image>", make_image(224, 224), SamplingParams()).n_image
    cmd = trtllm_build_command(exported_dir / "trtllm-checkpoint", tmp_path / "llm", manifest)
    assert cmd[0] == "trtllm-build"
    flags = dict(zip(cmd[1::2], cmd[2::2]))
    assert len(cmd) == 1 + 2 * len(flags)
    assert flags == {
        "--checkpoint_dir": str(exported_dir / "trtllm-checkpoint"), "--output_dir": str(tmp_path / "llm"),
        "--gpt_attention_plugin": "float32", "--gemm_plugin": "float32", "--use_fused_mlp": "enable",
        "--max_batch_size": "8", "--max_input_len": "1536", "--max_seq_len": "2048", "--max_num_tokens": "1536",
        "--max_multimodal_len": str(8 * largest)}
    assert largest == 336


def build_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "builder", "build", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONIOENCODING": "utf-8"})


def test_backend_refuses_a_geometry_the_runner_cannot_pack(tmp_path):
    """The demo's 112-px tiles: TensorRT-LLM's LLaVA-NeXT runner hard-codes 336 px; nothing is written."""
    proc = build_cli("--backend", "tensorrt-llm", "--output", str(tmp_path / "engine"), "--quiet", "--plugins", "off")
    assert proc.returncode == 1
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: --backend tensorrt-llm cannot serve this checkpoint: its CLIP tiles are 112 px")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(HAS_TRTLLM, reason="TensorRT-LLM is installed: the backend would really build")
def test_backend_without_tensorrt_llm_fails_in_one_line_and_keeps_the_exports(tmp_path):
    out = tmp_path / "engine"  # the real 336-px geometry, in fp16 (what a GPU build uses)
    proc = build_cli("--model", "llava-next-small", "--dtype", "float16", "--backend", "tensorrt-llm", "--output",
                     str(out), "--quiet", "--plugins", "off")
    assert proc.returncode == 1
    (line,) = proc.stderr.splitlines()
    assert line.startswith("error: --backend tensorrt-llm needs TensorRT-LLM (import tensorrt_llm failed")
    assert "install tensorrt-llm" in line and f"the PyTorch engine {out}" in line
    manifest = read_manifest(out, verify=True)  # a complete engine, every checksum right
    assert set(manifest.exports) == {"onnx", "trtllm-checkpoint"}
    assert (out / "vision" / "model.onnx").is_file() and (out / "trtllm-checkpoint" / "rank0.safetensors").is_file()
    assert not (out / "llm").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["engine"]
    assert json.loads((out / "vision/config.json").read_text())["builder_config"]["precision"] == "float16"


def test_trtexec_flags_follow_the_vision_export(exported_dir, tmp_path):
    config = json.loads((exported_dir / "vision/config.json").read_text())
    cmd = trtexec_command("trtexec", exported_dir, tmp_path / "model.engine", config)
    assert cmd == ["trtexec", f"--onnx={exported_dir / 'vision/model.onnx'}", f"--saveEngine={tmp_path / 'model.engine'}",
                   "--minShapes=input:1x3x112x112", "--optShapes=input:2x3x112x112", "--maxShapes=input:5x3x112x112"]
    config["builder_config"]["precision"] = "float16"
    assert "--fp16" in trtexec_command("trtexec", exported_dir, tmp_path / "e", config)


TRTEXEC = """#!{python}
# stands in for trtexec: writes --saveEngine, or fails
import pathlib, sys
out = next(a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--saveEngine="))
pathlib.Path(out).write_bytes(b"engine")
sys.exit({code})
"""


@pytest.mark.parametrize("code", [0, 2])
def test_vision_engine_appears_only_when_trtexec_succeeds(exported_dir, tmp_path, monkeypatch, code):
    engine = tmp_path / "engine"
    shutil.copytree(exported_dir, engine)
    monkeypatch.setattr(trtllm_build, "TRTEXEC_PLACES", (str(tmp_path / "no-trtexec"),))
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(ExportError, match="needs TensorRT's trtexec"):
        build_vision_engine(engine)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "trtexec").write_text(TRTEXEC.format(python=sys.executable, code=code))
    (bin_dir / "trtexec").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    if code:
        with pytest.raises(ExportError, match="trtexec failed with exit code 2"):
            build_vision_engine(engine)
        assert not (engine / "vision/model.engine").exists()
    else:
        assert build_vision_engine(engine) == engine / "vision/model.engine"
    assert sorted(p.name for p in (engine / "vision").iterdir() if p.name.startswith(".")) == []
    read_manifest(engine, verify=True)  # written after the manifest, and allowed to be


STUB = """#!{python}
# stands in for trtllm-build: records its arguments, writes or fails
import json, pathlib, sys
args = sys.argv[1:]
out = pathlib.Path(args[args.index("--output_dir") + 1])
(out / "args.json").write_text(json.dumps(args))
sys.exit({code})
"""


@pytest.mark.parametrize("code", [0, 3])
def test_backend_stages_trtllm_builds_output(exported_dir, tmp_path, monkeypatch, code):
    """With a stub trtllm-build (no TensorRT-LLM here): llm/ appears only when it succeeds."""
    engine = tmp_path / "engine"
    shutil.copytree(exported_dir, engine)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "trtllm-build").write_text(STUB.format(python=sys.executable, code=code))
    (bin_dir / "trtllm-build").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setitem(sys.modules, "tensorrt_llm", types.ModuleType("tensorrt_llm"))
    manifest = read_manifest(engine)
    if code:
        with pytest.raises(ExportError, match="trtllm-build failed with exit code 3"):
            build_llm_engine(engine, manifest)
        assert not (engine / "llm").exists()
    else:
        llm = build_llm_engine(engine, manifest)
        assert llm == engine / "llm"
        args = json.loads((llm / "args.json").read_text())
        assert args[:2] == ["--checkpoint_dir", str(engine / "trtllm-checkpoint")]
    assert sorted(p.name for p in engine.iterdir() if p.name.startswith(".")) == []
    read_manifest(engine, verify=True)
