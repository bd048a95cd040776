"""`build --backend tensorrt-llm`: TensorRT engines from the exports, by trtllm-build and trtexec.

Runs after the PyTorch engine and its exports are in place, so a missing TensorRT-LLM (it installs
only from NVIDIA's own package index, on GPU machines) stops the build with one line and leaves a
valid engine. The LLM engine goes to `<engine>/llm`, where TensorRT-LLM's multimodal runner looks
for it, staged and renamed into place like the engine itself; the vision engine to
`<engine>/vision/model.engine`, built from `vision/model.onnx` by TensorRT's trtexec with the
profile TensorRT-LLM's multimodal builder gives it (build_trt_engine: batch 1 .. the tiles of the
largest image, optimum half of that). Neither is in the manifest: they are written after it.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from ..format.atomic import staging_dir
from ..format.errors import ExportError
from ..format.manifest import Manifest
from ..network.vision import largest_image_tokens
from .trtllm_checkpoint import CHECKPOINT_DIR
from .vision_onnx import INPUT, VISION_DIR

LLM_ENGINE_DIR = "llm"
VISION_ENGINE = f"{VISION_DIR}/model.engine"
TRTEXEC_PLACES = ("/usr/src/tensorrt/bin/trtexec",)  # where NVIDIA's containers keep it, off PATH


def trtllm_build_command(checkpoint_dir: Path, output_dir: Path, manifest: Manifest) -> list[str]:
    """trtllm-build's flags for this engine: its dtype and limits, as in TensorRT-LLM's LLaVA-NeXT
    recipe (examples/models/core/multimodal/README.md)."""
    limits = manifest.limits
    return [
        "trtllm-build", "--checkpoint_dir", str(checkpoint_dir), "--output_dir", str(output_dir),
        "--gpt_attention_plugin", manifest.dtype, "--gemm_plugin", manifest.dtype, "--use_fused_mlp", "enable",
        "--max_batch_size", str(limits.max_batch_size), "--max_input_len", str(limits.max_input_len),
        "--max_seq_len", str(limits.max_seq_len),
        # a whole prompt, image tokens included, in one step: no context chunking needed
        "--max_num_tokens", str(limits.max_input_len),
        # the prompt table holds every request's packed image features at once
        "--max_multimodal_len", str(limits.max_batch_size * largest_image_tokens(manifest.vision)),
    ]


def trtexec_command(trtexec: str, engine_dir: Path, output: Path, vision_config: dict) -> list[str]:
    """trtexec's flags for the vision engine: the ONNX's precision and a profile over tile batches."""
    built = vision_config["builder_config"]
    tile = vision_config["pdrop"]["input"]["shape"][-1]
    most = built["max_batch_size"]

    def shape(n: int) -> str:
        return f"{INPUT}:{n}x3x{tile}x{tile}"
    return [trtexec, f"--onnx={engine_dir / VISION_DIR / 'model.onnx'}", f"--saveEngine={output}",
            *(["--fp16"] if built["precision"] == "float16" else []),
            f"--minShapes={shape(1)}", f"--optShapes={shape(max(1, most // 2))}", f"--maxShapes={shape(most)}"]


def build_vision_engine(engine_dir: Path) -> Path:
    """Run trtexec into `<engine_dir>/vision/model.engine`; ExportError (one line) when it cannot."""
    trtexec = shutil.which("trtexec") or next((p for p in TRTEXEC_PLACES if Path(p).is_file()), None)
    if trtexec is None:
        raise ExportError(f"the vision engine needs TensorRT's trtexec (not on PATH nor at {', '.join(TRTEXEC_PLACES)}); "
                          f"the LLM engine and {VISION_DIR}/model.onnx in {engine_dir} are intact")
    output = engine_dir / VISION_ENGINE
    staged = output.with_name(f".{output.name}.partial")
    config = json.loads((engine_dir / VISION_DIR / "config.json").read_text())
    try:
        code = subprocess.run(trtexec_command(trtexec, engine_dir, staged, config)).returncode
        if code != 0:
            raise ExportError(f"trtexec failed with exit code {code} (its log is above); the LLM engine and "
                              f"{VISION_DIR}/model.onnx in {engine_dir} are intact")
        staged.rename(output)
    finally:
        staged.unlink(missing_ok=True)
    return output


def _missing(reason: str, engine_dir: Path) -> ExportError:
    return ExportError(
        f"--backend tensorrt-llm needs TensorRT-LLM ({reason}): install tensorrt-llm from NVIDIA's package index "
        f"on a machine with an NVIDIA GPU and rerun; written meanwhile: the PyTorch engine {engine_dir} with "
        f"{VISION_DIR}/model.onnx and {CHECKPOINT_DIR}/ (the input of trtllm-build)")


def build_llm_engine(engine_dir: Path, manifest: Manifest) -> Path:
    """Run trtllm-build into `<engine_dir>/llm`; ExportError (one line) when it cannot run or fails."""
    try:
        import tensorrt_llm  # noqa: F401
    except Exception as e:  # ImportError, or its CUDA/TensorRT libraries failing to load
        raise _missing(f"import tensorrt_llm failed: {str(e).splitlines()[0]}", engine_dir) from None
    if shutil.which("trtllm-build") is None:
        raise _missing("tensorrt_llm imports but trtllm-build is not on PATH", engine_dir)
    output = engine_dir / LLM_ENGINE_DIR
    with staging_dir(output, force=True) as tmp:
        cmd = trtllm_build_command(engine_dir / CHECKPOINT_DIR, tmp, manifest)
        code = subprocess.run(cmd).returncode  # its log streams through: builds take minutes
        if code != 0:
            raise ExportError(f"trtllm-build failed with exit code {code} (its log is above); "
                              f"the PyTorch engine and its exports in {engine_dir} are intact")
    return output
