"""Checkpoint -> engine directory: fuse and rename weights, write the manifest, atomically.

The engine is staged beside the output and renamed into place only when complete (atomic.py).
"""
from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..format.atomic import staging_dir
from ..format.config import DTYPES, EXPORTS, Limits, PyramidSchedule
from ..format.errors import ConfigError, PdropError
from ..format.manifest import LLM_WEIGHTS, VISION_WEIGHTS, Manifest, checksum_dir, write_manifest
from .checkpoint import Checkpoint


def llm_weight_plan(n_layers: int, tied: bool) -> dict[str, list[str]]:
    """Engine tensor name -> the canonical checkpoint tensors concatenated (dim 0) to make it."""
    plan = {"tok_embeddings.weight": ["language_model.embed_tokens.weight"]}
    for i in range(n_layers):
        src, dst = f"language_model.layers.{i}.", f"layers.{i}."
        plan[dst + "attention.wqkv.weight"] = [src + f"self_attn.{p}_proj.weight" for p in "qkv"]
        plan[dst + "attention.wo.weight"] = [src + "self_attn.o_proj.weight"]
        plan[dst + "feed_forward.w13.weight"] = [src + "mlp.gate_proj.weight", src + "mlp.up_proj.weight"]
        plan[dst + "feed_forward.w2.weight"] = [src + "mlp.down_proj.weight"]
        plan[dst + "attention_norm.weight"] = [src + "input_layernorm.weight"]
        plan[dst + "ffn_norm.weight"] = [src + "post_attention_layernorm.weight"]
    plan["norm.weight"] = ["language_model.norm.weight"]
    plan["output.weight"] = ["language_model.embed_tokens.weight" if tied else "lm_head.weight"]
    return plan


def vision_weight_plan(names: list[str]) -> dict[str, list[str]]:
    plan = {"image_newline": ["image_newline"]}
    for n in names:
        for src, dst in (("vision_tower.", "tower."), ("multi_modal_projector.", "projector.")):
            if n.startswith(src):
                plan[dst + n[len(src):]] = [n]
    return plan


def stored_dtype(name: str, ckpt: Checkpoint) -> str:
    """The dtype the weights are stored in: `name`, or for "auto" the checkpoint's own."""
    if name == "auto":
        native = ckpt.hf_config.text_config.dtype or getattr(ckpt.hf_config, "dtype", None) or "float32"
        name = str(native).replace("torch.", "")
    if name not in DTYPES:
        raise ConfigError(f"unsupported dtype '{name}': choose auto, {', '.join(DTYPES)}")
    return name


def vision_spec(c) -> dict:
    """What the runtime's VisionEncoder needs from a transformers LlavaNextConfig."""
    return {"vision_config": c.vision_config.to_dict(), "projector_hidden_act": c.projector_hidden_act,
            "multimodal_projector_bias": c.multimodal_projector_bias,
            "vision_feature_layer": c.vision_feature_layer,
            "vision_feature_select_strategy": c.vision_feature_select_strategy,
            "image_grid_pinpoints": c.image_grid_pinpoints}


def eos_ids(ckpt: Checkpoint) -> list[int]:
    ids = {ckpt.processor.tokenizer.eos_token_id}
    gen = (ckpt.generation_config or {}).get("eos_token_id")
    ids.update(gen if isinstance(gen, list) else [gen])
    return sorted(i for i in ids if i is not None)


def _write_weights(ckpt: Checkpoint, plan: dict[str, list[str]], dtype: torch.dtype, path: Path, bar: tqdm) -> int:
    tensors, count = {}, 0
    for dst, srcs in plan.items():
        parts = [ckpt.load(s).to(dtype) for s in srcs]
        tensors[dst] = parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=0)
        count += tensors[dst].numel()
        bar.update(len(srcs))
    save_file(tensors, path, metadata={"format": "pt"})
    path.chmod(0o644)
    return count


def plugin_libraries(mode: str, archs: list[str] | None, progress: bool) -> tuple[list[Path], dict]:
    """The libraries to ship ('auto': when nvcc is there or the cache holds a build of these sources,
    'on': required, 'off') and their record: the kernels, and the TensorRT plugin where TensorRT
    headers are found."""
    from ..network.kernels import ABI_VERSION
    from .plugins import (
        DEFAULT_ARCHS,
        KERNELS,
        LIBRARY,
        TRT_LIBRARY,
        TRT_PLUGIN,
        compile_plugins,
        find_nvcc,
        find_tensorrt_include,
        prebuilt_plugins,
        ptx_arch,
    )

    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"--plugins must be auto, on or off, got '{mode}'")
    archs = archs or DEFAULT_ARCHS
    if mode == "off" or (mode == "auto" and find_nvcc() is None and prebuilt_plugins(archs) is None):
        reason = "disabled" if mode == "off" else "nvcc not found at build time"
        return [], {"library": None, "reason": reason}
    paths = [compile_plugins(archs, progress=progress)]
    record = {"library": LIBRARY, "kernels": KERNELS, "archs": archs, "ptx": f"compute_{ptx_arch(archs)}",
              "abi_version": ABI_VERSION, "tensorrt_plugin": None}
    tensorrt = find_tensorrt_include()
    if tensorrt:
        paths.append(compile_plugins(archs, progress=progress, tensorrt=tensorrt))
        record["tensorrt_plugin"] = {"library": TRT_LIBRARY, **TRT_PLUGIN}
    return paths, record


def cpu_kernel_libraries(mode: str, progress: bool) -> tuple[list[Path], dict]:
    """The CPU decode-attention libraries to ship ('auto': when a C++ compiler is there, 'on':
    required, 'off') and their record: instruction set -> library file."""
    from ..network.kernels import CPU_ABI_VERSION
    from .plugins import CPU_KERNELS, compile_cpu_kernels, find_cxx

    if mode not in ("auto", "on", "off"):
        raise ConfigError(f"--cpu-kernels must be auto, on or off, got '{mode}'")
    if mode == "off" or (mode == "auto" and find_cxx() is None):
        reason = "disabled" if mode == "off" else "no C++ compiler at build time"
        return [], {"libraries": None, "reason": reason}
    paths = compile_cpu_kernels(progress=progress)
    return list(paths.values()), {"libraries": {variant: p.name for variant, p in paths.items()},
                                  "kernels": CPU_KERNELS, "abi_version": CPU_ABI_VERSION}


def write_exports(engine_dir: Path, exports: Sequence[str], ckpt: Checkpoint, schedule: PyramidSchedule,
                  dtype: str) -> dict:
    """The asked-for exports (EXPORTS) of the engine being staged in `engine_dir`, read from its files."""
    from ..export.trtllm_checkpoint import write_checkpoint
    from ..export.vision_onnx import export_vision

    records = {}
    if "onnx" in exports:
        records["onnx"] = export_vision(engine_dir, vision_spec(ckpt.hf_config), ckpt.llm.dim, dtype)
    if "trtllm-checkpoint" in exports:
        records["trtllm-checkpoint"] = write_checkpoint(engine_dir, ckpt.llm, ckpt.hf_config.text_config.model_type,
                                                        dtype, schedule)
    return records


def build_engine(ckpt: Checkpoint, output: str | Path, schedule: PyramidSchedule, limits: Limits,
                 dtype: str = "auto", force: bool = False, progress: bool = True, plugins: str = "off",
                 cuda_archs: list[str] | None = None, exports: Sequence[str] = (),
                 cpu_kernels: str = "auto") -> tuple[Manifest, int]:
    """Convert `ckpt` into an engine directory at `output`, with the `exports` named (EXPORTS).
    `dtype` "auto" stores the checkpoint's dtype and lets the runtime choose what runs
    (network.precision); a DTYPES name is stored and run on every device. Returns the manifest and
    parameter count."""
    llm = ckpt.llm
    limits.validate(llm, ckpt.sliding_window)
    precision, dtype = dtype, stored_dtype(dtype, ckpt)
    unknown = sorted(set(exports) - set(EXPORTS))
    if unknown:
        raise ConfigError(f"unknown export '{unknown[0]}': choose {', '.join(EXPORTS)}")
    if "onnx" in exports:
        from ..export.vision_onnx import require_onnx

        require_onnx()  # before converting anything
    tied = "lm_head.weight" not in ckpt.names
    llm_plan, vision_plan = llm_weight_plan(llm.n_layers, tied), vision_weight_plan(ckpt.names)
    output = Path(output)
    libraries, plugin_record = plugin_libraries(plugins, cuda_archs, progress)
    cpu_libraries, plugin_record["cpu"] = cpu_kernel_libraries(cpu_kernels, progress)
    with staging_dir(output, force) as tmp:
        for library in libraries + cpu_libraries:
            shutil.copy(library, tmp / library.name)
        total = sum(len(s) for s in llm_plan.values()) + sum(len(s) for s in vision_plan.values())
        with tqdm(total=total, desc="converting", unit="tensor", disable=not progress) as bar:
            params = _write_weights(ckpt, llm_plan, getattr(torch, dtype), tmp / LLM_WEIGHTS, bar)
            params += _write_weights(ckpt, vision_plan, getattr(torch, dtype), tmp / VISION_WEIGHTS, bar)
        try:
            ckpt.processor.save_pretrained(tmp)
        except Exception as e:
            raise PdropError(f"cannot save the processor: {e}") from None
        records = write_exports(tmp, exports, ckpt, schedule, dtype)
        manifest = Manifest(
            llm=llm, vision=vision_spec(ckpt.hf_config), pyramid=schedule, dtype=dtype, limits=limits,
            image_token_id=ckpt.hf_config.image_token_id, eos_token_ids=eos_ids(ckpt),
            source={"checkpoint": ckpt.source, "fingerprint": ckpt.fingerprint}, files=checksum_dir(tmp),
            plugins=plugin_record, exports=records, precision=precision)
        write_manifest(tmp, manifest)
    return manifest, params
