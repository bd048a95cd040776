"""Engine -> Triton model repository: fill the `triton_repo/` template, validate, write atomically.

    REPO/<model-name>/config.pbtxt     the template, filled (batch size, instances, engine path)
    REPO/<model-name>/1/model.py       the Python-backend model
    REPO/<model-name>/1/engine/        the engine itself, with --copy-engine (else referenced by path)
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from string import Template

from ..format.atomic import staging_dir
from ..format.config import SCHEDULERS, check_dtype
from ..format.errors import ConfigError, PdropError
from ..format.manifest import read_manifest

TEMPLATE = Path(__file__).resolve().parents[2] / "triton_repo" / "pdrop"


def validate_config(text: str) -> None:
    """Parse config.pbtxt with Triton's own ModelConfig schema (from tritonclient)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise PdropError(f"generated config.pbtxt is invalid: {e}") from None


def package_repo(engine: str | Path, output: str | Path, model_name: str = "pdrop", instances: int = 1,
                 max_batch_size: int | None = None, copy_engine: bool = False, device: str = "auto",
                 max_queue_delay_us: int = 2000, force: bool = False, scheduler: str = "inflight",
                 kv_cache_tokens: int = 0, max_queued_requests: int = 64, kv_cache_memory_fraction: float = 0.0,
                 decoupled: bool = True, gpus: list[int] | None = None,
                 prefix_cache_tokens: int | None = None, dtype: str = "auto") -> Path:
    """Write a model repository serving `engine`; returns the model's directory. `scheduler`,
    `kv_cache_tokens` (0: the engine's default pool), `kv_cache_memory_fraction` (CUDA; 0: the
    default, 0.9) and `max_queued_requests` configure the engine's in-flight batching (Engine.load).
    `decoupled` False serves unary clients (ModelInfer): one response per request, no streaming.
    `gpus`: `instances` instances on each of these GPUs (KIND_GPU), each loading the engine on its
    own GPU (instance_device). `prefix_cache_tokens`: the prefix cache's token slots per layer (None:
    the engine's default; 0: off). `dtype`: the precision to run in ("auto": what the build chose,
    network.precision)."""
    engine, output = Path(engine).resolve(), Path(output).resolve()
    manifest = read_manifest(engine, verify=True)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", model_name):
        raise ConfigError(f"--model-name may hold letters, digits, '_', '.' and '-', got '{model_name}'")
    limit = manifest.limits.max_batch_size
    batch = limit if max_batch_size is None else max_batch_size
    if not 1 <= batch <= limit:
        raise ConfigError(f"--max-batch-size must be in 1..{limit} (the engine's limit), got {batch}")
    if instances < 1:
        raise ConfigError(f"--instances must be positive, got {instances}")
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got '{scheduler}'")
    if kv_cache_tokens < 0 or max_queued_requests < 1 or not 0 <= kv_cache_memory_fraction < 1:
        raise ConfigError("--kv-cache-tokens must be >= 0, --kv-cache-memory-fraction in [0, 1) and "
                          "--max-queued-requests positive")
    if prefix_cache_tokens is not None and prefix_cache_tokens < 0:
        raise ConfigError(f"--prefix-cache-tokens must be >= 0 (0 turns the cache off), got {prefix_cache_tokens}")
    check_dtype(dtype)
    if gpus is not None and (not gpus or len(set(gpus)) != len(gpus) or min(gpus) < 0):
        raise ConfigError(f"--gpus must list distinct GPU indices, e.g. 0,1,2,3; got {gpus}")
    if gpus and device not in ("auto", "cuda"):
        raise ConfigError(f"--gpus puts an engine on each listed GPU: leave --device auto (got '{device}')")
    if not (TEMPLATE / "config.pbtxt").is_file():
        raise PdropError(f"model repository template not found at {TEMPLATE}: package needs a source checkout")
    engine_ref = output / model_name / "1" / "engine" if copy_engine else engine
    if '"' in str(engine_ref) or "\\" in str(engine_ref):
        raise ConfigError(f"the engine path may not contain quotes or backslashes: {engine_ref}")
    text = Template((TEMPLATE / "config.pbtxt").read_text()).substitute(
        model_name=model_name, max_batch_size=batch, instances=instances, engine_dir=engine_ref, device=device,
        dtype=dtype, max_queue_delay_microseconds=max_queue_delay_us, drop_ratio=manifest.pyramid.drop_ratio,
        drop_layers=",".join(map(str, manifest.pyramid.layers)), scheduler=scheduler, kv_cache_tokens=kv_cache_tokens,
        max_queued_requests=max_queued_requests, kv_cache_memory_fraction=kv_cache_memory_fraction,
        decoupled=str(decoupled).lower(), instance_kind="KIND_GPU" if gpus else "KIND_CPU",
        gpus=f" gpus: [ {', '.join(map(str, gpus))} ]" if gpus else "",
        prefix_cache_tokens="" if prefix_cache_tokens is None else prefix_cache_tokens)
    validate_config(text)
    with staging_dir(output, force) as tmp:
        version = tmp / model_name / "1"
        version.mkdir(parents=True)
        shutil.copy(TEMPLATE / "1" / "model.py", version / "model.py")
        if copy_engine:
            shutil.copytree(engine, version / "engine")
        (tmp / model_name / "config.pbtxt").write_text(text)
    return output / model_name


def instance_device(configured: str, kind: str, device_id: int | str) -> str:
    """The device a Triton model instance loads its engine on: its own GPU for a KIND_GPU instance
    (Triton's model_instance_kind "GPU" and model_instance_device_id), else the configured one."""
    return f"cuda:{int(device_id)}" if kind == "GPU" else configured
