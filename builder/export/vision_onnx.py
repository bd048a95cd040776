"""The vision tower + projector as ONNX, laid out as TensorRT-LLM's multimodal runtime reads it.

`vision/model.onnx` maps tiles `input` (batch, 3, H, W) to `encoder_output` = VisionEncoder.features
(projector of the selected CLIP layer without CLS: TensorRT-LLM's `hidden_states[-2][:, 1:]` for
LLaVA-NeXT). The anyres packing stays outside the graph, on the host, with `image_newline` from
`vision/image_newlines.safetensors`. Input/output names, opset 17, the dynamic `batch` axis, eager
attention and float16 for half-precision engines follow NVIDIA/TensorRT-LLM
tensorrt_llm/tools/multimodal_builder.py (export_onnx, build_llava_engine, build_trt_engine);
`vision/config.json` holds what tensorrt_llm/runtime/multimodal_model_runner.py reads from it
(`builder_config.model_type`, `.precision`, `.output_shape`), our own record beside it under
`pdrop`. Every export is checked with onnxruntime against the engine's torch encoder in the
export's precision.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..format.errors import ExportError
from ..format.manifest import VISION_WEIGHTS
from ..network.vision import VisionEncoder, max_tiles

VISION_DIR = "vision"
OPSET = 17
INPUT, OUTPUT = "input", "encoder_output"
# the largest |onnxruntime - torch| allowed, relative to the largest |torch| output (at least 1):
# fp32 agrees to rounding; fp16 graphs and torch's fp16 kernels round differently
TOLERANCE = {"float32": 1e-4, "float16": 1e-2}
TRACE_BATCH, CHECK_BATCHES = 2, (1, 3)  # checked at batch sizes other than the traced one: the axis is dynamic
# TensorRT-LLM's LLaVA-NeXT runner (LlavaNextUtils) hard-codes CLIP's 336-px tiles of 14-px patches and
# LLaVA-NeXT's five grid pinpoints: other geometries would be packed wrongly
RUNNER_TILE, RUNNER_PATCH = 336, 14
RUNNER_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def precision(dtype: str) -> str:
    """The export's dtype for an engine of `dtype`: float32, else float16 (as NVIDIA's builder: the
    ONNX Conv has no bfloat16)."""
    return "float32" if dtype == "float32" else "float16"


def runner_geometry_problem(spec: dict) -> str | None:
    """Why TensorRT-LLM's multimodal runner cannot pack this checkpoint's image features, or None."""
    vc = spec["vision_config"]
    if (vc["image_size"], vc["patch_size"]) != (RUNNER_TILE, RUNNER_PATCH):
        return (f"its CLIP tiles are {vc['image_size']} px of {vc['patch_size']}-px patches; TensorRT-LLM's "
                f"LLaVA-NeXT runner handles only {RUNNER_TILE} px of {RUNNER_PATCH}")
    if sorted(map(list, spec["image_grid_pinpoints"])) != sorted(RUNNER_PINPOINTS):
        return (f"its anyres pinpoints are {spec['image_grid_pinpoints']}; TensorRT-LLM's LLaVA-NeXT runner "
                f"handles only {RUNNER_PINPOINTS}")
    return None


def require_onnx() -> None:
    """Refuse up front, in one line, when the export's packages are not installed."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ExportError(f"the ONNX export needs onnx and onnxruntime ({e}): pip install 'pdrop[export]'") from None


class _Features(torch.nn.Module):
    """torch.onnx.export traces a module's forward: this one is VisionEncoder.features."""

    def __init__(self, encoder: VisionEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.encoder.features(pixel_values)


def _encoder(weights: dict[str, torch.Tensor], spec: dict, text_dim: int, attention: str,
             dtype: torch.dtype) -> VisionEncoder:
    """The engine's vision weights in the export's dtype."""
    encoder = VisionEncoder(spec, text_dim, attention)
    encoder.load_weights({k: v.to(dtype) for k, v in weights.items()})
    return encoder.to(dtype).eval()


def _relative_diff(onnx_path: Path, encoder: VisionEncoder, dtype: torch.dtype, batch_sizes: tuple[int, ...]
                   ) -> float:
    """Largest |onnxruntime - torch| over random tiles of each batch size, over max(1, largest |torch|)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for b in batch_sizes:
        x = torch.randn(b, 3, encoder.tile, encoder.tile, generator=g).to(dtype)
        (got,) = session.run([OUTPUT], {INPUT: x.numpy()})
        with torch.inference_mode():
            want = encoder.features(x).float()
        diff = (torch.from_numpy(got).float() - want).abs().max().item()
        worst = max(worst, diff / max(1.0, want.abs().max().item()))
    return worst


def export_vision(engine_dir: Path, spec: dict, text_dim: int, dtype: str) -> dict:
    """Write `vision/` (model.onnx, image_newlines.safetensors, config.json) into an engine of
    `dtype` being built; returns what the manifest records. Raises ExportError when the check fails."""
    import onnxruntime as ort

    out = engine_dir / VISION_DIR
    out.mkdir()
    weights = load_file(engine_dir / VISION_WEIGHTS)
    name = precision(dtype)
    torch_dtype = getattr(torch, name)
    eager = _encoder(weights, spec, text_dim, "eager", torch_dtype)
    example = torch.randn(TRACE_BATCH, 3, eager.tile, eager.tile, generator=torch.Generator().manual_seed(0))
    example = example.to(torch_dtype)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes
            # the TorchScript exporter: the dynamo one needs onnxscript and gains nothing on this graph
            torch.onnx.export(_Features(eager), (example,), str(out / "model.onnx"), dynamo=False,
                              opset_version=OPSET, input_names=[INPUT], output_names=[OUTPUT],
                              dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
            tokens, dim = eager.features(example).shape[1:]
    except Exception as e:  # torch.onnx raises many kinds
        raise ExportError(f"ONNX export of the vision tower failed: {e}") from None
    # compared with the runtime's own (sdpa) encoder, not with the eager copy that was traced
    diff = _relative_diff(out / "model.onnx", _encoder(weights, spec, text_dim, "sdpa", torch_dtype), torch_dtype,
                          CHECK_BATCHES)
    tolerance = TOLERANCE[name]
    if not diff <= tolerance:
        raise ExportError(f"the ONNX vision encoder differs from torch by {diff:.3g} of its output scale "
                          f"(> {tolerance}, {name})")
    save_file({"image_newline": weights["image_newline"].to(torch_dtype)}, out / "image_newlines.safetensors",
              metadata={"format": "pt"})
    tile = eager.tile
    config = {
        # what TensorRT-LLM's multimodal builder writes (Builder.save_config) and its runner reads
        "builder_config": {"model_type": "llava_next", "precision": name, "max_batch_size": max_tiles(spec),
                           "strongly_typed": False, "model_name": "multiModal", "output_shape": [-1, tokens, dim]},
        "pdrop": {
            "file": "model.onnx", "opset": OPSET,
            "input": {"name": INPUT, "shape": ["batch", 3, tile, tile], "dtype": name},
            "output": {"name": OUTPUT, "shape": ["batch", tokens, dim], "dtype": name},
            "max_batch_size": max_tiles(spec),  # tiles of the largest image: a TensorRT profile's max
            "vision_feature_layer": spec["vision_feature_layer"],
            "vision_feature_select_strategy": spec["vision_feature_select_strategy"],
            "attention": "eager", "image_newlines": "image_newlines.safetensors",
            "runner_geometry": runner_geometry_problem(spec) or "supported",
            "verified": {"runtime": f"onnxruntime {ort.__version__}",
                         "against": f"torch VisionEncoder.features ({name})", "batch_sizes": list(CHECK_BATCHES),
                         "relative_max_abs_diff": diff, "tolerance": tolerance},
        },
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return {"path": f"{VISION_DIR}/model.onnx", "opset": OPSET, "precision": name, "relative_max_abs_diff": diff,
            "tolerance": tolerance}
