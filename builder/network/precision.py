"""The precision an engine runs in: one policy for every device and entry point.

    build --dtype auto   the engine stores the checkpoint's dtype and records "auto": the runtime
                         chooses at load, on a GPU the stored dtype, on a CPU bfloat16 where it
                         computes bf16 natively (AVX512-BF16 or AMX) and float32 elsewhere
                         (OpenVINO's choice: emulated bf16 is slower than fp32 there)
    build --dtype X      X on every device
    run --dtype, package --dtype, Engine.load(dtype=)   override what the build recorded

Every (device, dtype) pair runs; float16 on a CPU runs on torch ops (the CPU kernels take fp32
and bf16 only), slowly.
"""
from __future__ import annotations

import torch

from ..format.config import check_dtype
from ..format.errors import InputError


def cpu_has_bf16() -> bool:
    """Native bfloat16 arithmetic (AVX512-BF16 or AMX). Tests replace this to stand for the other
    kind of CPU."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_dtype(requested: str | None, built: str, stored: str, device: torch.device) -> torch.dtype:
    """The dtype to run in: `requested` (run/package/load) unless None or "auto"; else `built`,
    what the build recorded (a DTYPES name, or "auto"); "auto" is the device's choice, with
    `stored` the dtype of the engine's weights."""
    for name in (requested, built):
        if name is not None:
            check_dtype(name, InputError)
    name = requested if requested not in (None, "auto") else built
    if name == "auto":
        name = stored if device.type == "cuda" else "bfloat16" if cpu_has_bf16() else "float32"
    return getattr(torch, name)
