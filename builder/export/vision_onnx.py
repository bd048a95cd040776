"""The vision tower + projector as ONNX, laid out as TensorRT-LLM's multimodal runtime reads it.

`vision/model.onnx` maps tiles `input` (batch, 3, H, W) to `encoder_output` = VisionEncoder.features
(projector of the selected CLIP layer without CLS: TensorRT-LLM's `hidden_states[-2][:, 1:]` for
LLaVA-NeXT). The anyres packing stays outside the graph, on the host, with `image_newline` from
`vision/image_newlines.safetensors`. Input/output names, opset 17, the dynamic `batch` axis and eager
attention follow NVIDIA/TensorRT-LLM tensorrt_llm/tools/multimodal_builder.py (export_onnx,
build_llava_engine). Every export is checked with onnxruntime against the engine's torch encoder.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..format.errors import ExportError
from ..format.manifest import VISION_WEIGHTS
from ..runtime.vision import VisionEncoder, max_tiles

VISION_DIR = "vision"
OPSET = 17
INPUT, OUTPUT = "input", "encoder_output"
TOLERANCE = 1e-4  # max abs difference allowed between the fp32 graph and the fp32 torch encoder
TRACE_BATCH, CHECK_BATCHES = 2, (1, 3)  # checked at batch sizes other than the traced one: the axis is dynamic


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


def _encoder(weights: dict[str, torch.Tensor], spec: dict, text_dim: int, attention: str) -> VisionEncoder:
    """The engine's vision weights in fp32 (the export's precision; TensorRT picks its own at build)."""
    encoder = VisionEncoder(spec, text_dim, attention)
    encoder.load_weights({k: v.float() for k, v in weights.items()})
    return encoder.eval()


def _max_abs_diff(onnx_path: Path, encoder: VisionEncoder, batch_sizes: tuple[int, ...]) -> float:
    """Largest |onnxruntime - torch| over random tiles of each batch size."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for b in batch_sizes:
        x = torch.randn(b, 3, encoder.tile, encoder.tile, generator=g)
        (got,) = session.run([OUTPUT], {INPUT: x.numpy()})
        with torch.inference_mode():
            want = encoder.features(x)
        worst = max(worst, (torch.from_numpy(got) - want).abs().max().item())
    return worst


def export_vision(engine_dir: Path, spec: dict, text_dim: int) -> dict:
    """Write `vision/` (model.onnx, image_newlines.safetensors, config.json) into an engine being
    built; returns what the manifest records. Raises ExportError when the check fails."""
    import onnxruntime as ort

    out = engine_dir / VISION_DIR
    out.mkdir()
    weights = load_file(engine_dir / VISION_WEIGHTS)
    eager = _encoder(weights, spec, text_dim, attention="eager")
    example = torch.randn(TRACE_BATCH, 3, eager.tile, eager.tile, generator=torch.Generator().manual_seed(0))
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
    diff = _max_abs_diff(out / "model.onnx", _encoder(weights, spec, text_dim, attention="sdpa"), CHECK_BATCHES)
    if not diff <= TOLERANCE:
        raise ExportError(f"the ONNX vision encoder differs from torch by {diff:.3g} (> {TOLERANCE})")
    save_file({"image_newline": weights["image_newline"]}, out / "image_newlines.safetensors",
              metadata={"format": "pt"})
    tile = eager.tile
    config = {
        "model_type": "llava_next", "file": "model.onnx", "opset": OPSET,
        "input": {"name": INPUT, "shape": ["batch", 3, tile, tile], "dtype": "float32"},
        "output": {"name": OUTPUT, "shape": ["batch", tokens, dim], "dtype": "float32"},
        "max_batch_size": max_tiles(spec),  # tiles of the largest image: a TensorRT profile's max
        "vision_feature_layer": spec["vision_feature_layer"],
        "vision_feature_select_strategy": spec["vision_feature_select_strategy"],
        "attention": "eager", "image_newlines": "image_newlines.safetensors",
        "verified": {"runtime": f"onnxruntime {ort.__version__}", "against": "torch VisionEncoder.features (fp32)",
                     "batch_sizes": list(CHECK_BATCHES), "max_abs_diff": diff, "tolerance": TOLERANCE},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return {"path": f"{VISION_DIR}/model.onnx", "opset": OPSET, "max_abs_diff": diff, "tolerance": TOLERANCE}
