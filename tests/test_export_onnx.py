"""`build --export onnx`: the vision tower + projector as vision/model.onnx, in TensorRT-LLM's layout.

The graph is run with onnxruntime against the runtime's own torch encoder (the one `Engine.load`
builds), read by onnx and by polygraphy (the TensorRT tool's ONNX inspector) as a separate process.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from builder.cli import main
from builder.export import vision_onnx
from builder.format.manifest import read_manifest
from builder.runtime.engine import Engine

TILE = 112  # the demo preset's CLIP tile
POLYGRAPHY = shutil.which("polygraphy", path=str(Path(sys.executable).parent)) or shutil.which("polygraphy")


@pytest.fixture(scope="module")
def onnx_path(exported_dir):
    return exported_dir / "vision" / "model.onnx"


@pytest.fixture(scope="module")
def encoder(exported_dir):
    return Engine.load(exported_dir, device="cpu").vision


@pytest.mark.parametrize("batch", [1, 5])
def test_onnxruntime_equals_the_torch_encoder(encoder, onnx_path, batch):
    x = torch.randn(batch, 3, TILE, TILE, generator=torch.Generator().manual_seed(batch))
    (got,) = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})
    with torch.inference_mode():
        want = encoder.features(x)
    assert got.shape == (batch, (TILE // 14) ** 2, 128)
    assert (torch.from_numpy(got) - want).abs().max().item() <= 1e-4


def test_graph_has_opset_17_and_a_dynamic_batch_axis(onnx_path):
    model = onnx.load(onnx_path)
    onnx.checker.check_model(model)
    assert {o.domain: o.version for o in model.opset_import}[""] >= 17
    (inp,), (out,) = model.graph.input, model.graph.output
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert (inp.name, dims) == ("input", ["batch", 3, TILE, TILE])
    assert out.name == "encoder_output"
    assert out.type.tensor_type.shape.dim[0].dim_param == "batch"


def test_vision_dir_is_laid_out_and_checksummed(exported_dir):
    vision = exported_dir / "vision"
    newline = load_file(vision / "image_newlines.safetensors")
    assert list(newline) == ["image_newline"]
    assert torch.equal(newline["image_newline"], load_file(exported_dir / "vision.safetensors")["image_newline"])
    ours = json.loads((vision / "config.json").read_text())["pdrop"]
    assert ours["opset"] == 17 and ours["vision_feature_layer"] == -2
    assert ours["input"] == {"name": "input", "shape": ["batch", 3, TILE, TILE], "dtype": "float32"}
    assert ours["output"]["shape"] == ["batch", 64, 128] and ours["max_batch_size"] == 5
    manifest = read_manifest(exported_dir, verify=True)
    assert {"vision/model.onnx", "vision/config.json", "vision/image_newlines.safetensors"} <= set(manifest.files)
    record = manifest.exports["onnx"]
    assert record["path"] == "vision/model.onnx" and 0 <= record["relative_max_abs_diff"] <= 1e-4
    assert ours["verified"]["relative_max_abs_diff"] == record["relative_max_abs_diff"]


# What tensorrt_llm/runtime/multimodal_model_runner.py reads from vision/ for LLaVA-NeXT (its
# __init__, init_image_encoder, the C++ end-to-end path) and what its engine input gets.
RUNNER_READS = {
    ("builder_config", "model_type"): "llava_next",
    ("builder_config", "precision"): None,  # the dtype it casts pixels to: the graph's input dtype
    ("builder_config", "output_shape"): None,  # read by the C++ end-to-end session
}
ONNX_DTYPES = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16}


@pytest.fixture(scope="module")
def half_dir(demo_ckpt, tmp_path_factory):
    from conftest import _build

    return _build(demo_ckpt, tmp_path_factory.mktemp("half") / "demo", 0.5, ["onnx"], dtype="float16")


@pytest.mark.parametrize("which", ["float32", "float16"])
def test_config_is_what_the_runner_reads(which, exported_dir, half_dir):
    vision = (exported_dir if which == "float32" else half_dir) / "vision"
    config = json.loads((vision / "config.json").read_text())
    for (section, key), value in RUNNER_READS.items():
        assert key in config[section]
        assert value is None or config[section][key] == value
    assert config["builder_config"]["precision"] == which
    assert config["builder_config"]["output_shape"] == [-1, 64, 128]
    (inp,) = onnx.load(vision / "model.onnx").graph.input
    assert inp.type.tensor_type.elem_type == ONNX_DTYPES[config["builder_config"]["precision"]]
    assert (vision / "image_newlines.safetensors").is_file()


def test_half_export_equals_the_torch_encoder_within_fp16_rounding(half_dir):
    encoder = Engine.load(half_dir, device="cpu").vision  # the runtime's own fp16 encoder
    x = torch.randn(3, 3, TILE, TILE, generator=torch.Generator().manual_seed(3)).half()
    session = ort.InferenceSession(str(half_dir / "vision/model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.inference_mode():
        want = encoder.features(x).float()
    assert got.dtype == "float16"
    diff = (torch.from_numpy(got).float() - want).abs().max().item() / max(1.0, want.abs().max().item())
    assert 0 < diff <= vision_onnx.TOLERANCE["float16"]
    assert read_manifest(half_dir).exports["onnx"]["precision"] == "float16"


def test_runner_geometry_is_checked(demo_ckpt):
    from builder.convert.build import vision_spec
    from builder.convert.presets import preset_checkpoint

    assert "CLIP tiles are 112 px" in vision_onnx.runner_geometry_problem(vision_spec(demo_ckpt.hf_config))
    spec = vision_spec(preset_checkpoint("llava-next-small").hf_config)
    assert vision_onnx.runner_geometry_problem(spec) is None
    spec["image_grid_pinpoints"] = [[336, 672], [672, 336]]
    assert "anyres pinpoints are" in vision_onnx.runner_geometry_problem(spec)


def test_polygraphy_inspects_the_model(onnx_path):
    assert POLYGRAPHY, "polygraphy is a test dependency: pip install -e '.[test]'"
    proc = subprocess.run([POLYGRAPHY, "inspect", "model", str(onnx_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert "ONNX Opset: 17" in out
    assert f"{{input [dtype=float32, shape=('batch', 3, {TILE}, {TILE})]}}" in out
    assert "{encoder_output [dtype=float32, shape=('batch'," in out


def test_missing_export_packages_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    assert main(["build", "--export", "onnx", "--output", str(tmp_path / "e"), "--quiet",
                 "--plugins", "off"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: the ONNX export needs onnx and onnxruntime")
    assert "pip install 'pdrop[export]'" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_a_failed_check_fails_the_build_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(vision_onnx.TOLERANCE, "float32", -1.0)  # no difference passes
    assert main(["build", "--export", "onnx", "--output", str(tmp_path / "e"), "--quiet",
                 "--plugins", "off"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: the ONNX vision encoder differs from torch by")
    assert list(tmp_path.iterdir()) == []
