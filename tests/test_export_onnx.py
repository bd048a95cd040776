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
    config = json.loads((vision / "config.json").read_text())
    assert config["opset"] == 17 and config["vision_feature_layer"] == -2
    assert config["input"] == {"name": "input", "shape": ["batch", 3, TILE, TILE], "dtype": "float32"}
    assert config["output"]["shape"] == ["batch", 64, 128] and config["max_batch_size"] == 5
    manifest = read_manifest(exported_dir, verify=True)
    assert {"vision/model.onnx", "vision/config.json", "vision/image_newlines.safetensors"} <= set(manifest.files)
    record = manifest.exports["onnx"]
    assert record["path"] == "vision/model.onnx" and 0 <= record["max_abs_diff"] <= 1e-4
    assert config["verified"]["max_abs_diff"] == record["max_abs_diff"]


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
    monkeypatch.setattr(vision_onnx, "TOLERANCE", -1.0)  # no difference passes
    assert main(["build", "--export", "onnx", "--output", str(tmp_path / "e"), "--quiet",
                 "--plugins", "off"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: the ONNX vision encoder differs from torch by")
    assert list(tmp_path.iterdir()) == []
