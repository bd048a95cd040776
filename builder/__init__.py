"""pdrop: a LLaVA-NeXT engine builder and runtime with PyramidDrop (arXiv 2410.17247) inside the model.

The public API, for users and for the Triton model (triton_repo/): load an engine and generate,
prepare requests, the errors, and the Triton request/response protocol.

    from builder import Engine
    engine = Engine.load("engines/demo", device="cpu")
"""
from importlib import import_module

from .format import __version__
from .format.errors import CheckpointError, ConfigError, EngineError, ExportError, InputError, PdropError

# Loaded on first use, so `python -m builder --help`, a bad flag or a gRPC client answer before
# torch and transformers load.
_LAZY = {"Engine": "runtime.engine", "Request": "runtime.engine", "Result": "runtime.engine",
         "Delta": "runtime.engine", "SamplingParams": "runtime.sampling", "PyramidSchedule": "format.config",
         "parse_request": "serve.protocol", "response_tensors": "serve.protocol", "check_budget": "serve.protocol",
         "instance_device": "serve.package"}

__all__ = ["CheckpointError", "ConfigError", "EngineError", "ExportError", "InputError", "PdropError",
           "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'builder' has no attribute {name!r}")
