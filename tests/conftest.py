"""Shared fixtures: the demo preset, its Hugging Face export and engines built from it, all on CPU;
and the reading of the plugins' C headers, for the tests of their ctypes bindings."""
from __future__ import annotations

import ctypes
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from builder.convert.build import build_engine
from builder.convert.plugins import find_nvcc, prebuilt_plugins
from builder.convert.presets import preset_checkpoint, write_hf_checkpoint
from builder.format.config import EXPORTS, Limits, PyramidSchedule
from builder.runtime.engine import Engine
from builder.runtime.paged_kv import SequenceKV
from builder.network.pyramid import ImageSpan

DEMO_LAYERS = [2, 4, 6]
# The GPU's architecture ("90"; None without a GPU), and why the GPU tests cannot have its CUDA kernels (None
# when nvcc compiles them or scripts/gpu_prepare.sh prebuilt them into the cache): those tests skip saying so.
CUDA_ARCH = "".join(map(str, torch.cuda.get_device_capability())) if torch.cuda.is_available() else None
CUDA_KERNELS_MISSING = (None if CUDA_ARCH is None or find_nvcc() or prebuilt_plugins([CUDA_ARCH]) else
                        f"no nvcc (CUDA toolkit), and no CUDA kernels for sm_{CUDA_ARCH} in the cache "
                        "(scripts/gpu_prepare.sh prebuilds them)")
C_TYPES = {"int": ctypes.c_int, "int64_t": ctypes.c_int64, "float": ctypes.c_float, "size_t": ctypes.c_size_t,
           "const char*": ctypes.c_char_p}


def ctype(decl: str, named: bool):
    """A C declaration ('const void* q', 'int batch', 'size_t') as the ctypes type it passes as."""
    words = decl.replace("*", "* ").split()
    if named:
        words = words[:-1]  # the parameter's name
    kind = " ".join(words).replace(" *", "*").replace("* ", "*")
    if kind in C_TYPES:
        return C_TYPES[kind]
    assert kind.endswith("*") or kind == "cudaStream_t", f"unmapped C type {kind!r}"
    return ctypes.c_void_p


def header_prototypes(header: Path) -> dict[str, tuple[object, list[object]]]:
    """Every pdrop_* function a C header declares, as (restype, argtypes) for ctypes."""
    text = re.sub(r"/\*.*?\*/", "", header.read_text(), flags=re.S)
    protos = {}
    for ret, name, params in re.findall(r"^([\w ]+\**)\s+(pdrop_\w+)\(([^)]*)\);", text, flags=re.M):
        args = [] if params.strip() == "void" else [ctype(p, named=True) for p in params.split(",")]
        protos[name] = (ctype(ret, named=False), args)
    return protos


def allocate(engine, req) -> SequenceKV:
    """Blocks of the engine's pool for one prepared request, room for its max_new_tokens included."""
    n_blocks = engine.scheduler.blocks_for(req)
    return SequenceKV.of(engine.pool.allocate(sum(n_blocks)), n_blocks)


def prefill_into(engine, req, seq: SequenceKV) -> tuple:
    """The engine's prefill of one prepared request into `seq`'s blocks: its embeddings (1, L, dim),
    final hidden states and stage stats."""
    with torch.inference_mode():
        embeds, _ = engine.embed(req)
        span = ImageSpan.full(req.image_start, req.n_image, engine.device) if req.n_image else None
        return (embeds, *engine.llm.prefill(embeds, seq, span, req.schedule))


@contextmanager
def prefilled(engine, req):
    """prefill_into newly allocated blocks: yields the embeddings, final hidden states, stage stats
    and KV bookkeeping (for engine.decoder.step); the blocks go back after."""
    seq = allocate(engine, req)
    try:
        yield (*prefill_into(engine, req, seq), seq)
    finally:
        engine.pool.release(seq.block_ids())


def prefill(engine, req):
    """prefilled's embeddings, final hidden states and stage stats."""
    with prefilled(engine, req) as (embeds, h, stages, _):
        return embeds, h, stages


def make_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def demo_ckpt():
    return preset_checkpoint("demo")


@pytest.fixture(scope="session")
def hf_dir(demo_ckpt, tmp_path_factory):
    return write_hf_checkpoint(demo_ckpt, tmp_path_factory.mktemp("hf") / "demo-hf")


def _build(ckpt, path, drop, exports=(), dtype="float32", cpu_kernels="auto", plugins="off", cuda_archs=None):
    """A demo engine; float32 unless said (an explicit dtype runs on every CPU: the exactness tests
    mean fp32 whatever the CPU's default; test_precision.py tests the default path)."""
    build_engine(ckpt, path, PyramidSchedule.create(8, drop, DEMO_LAYERS), Limits(8, 1536, 2048), dtype,
                 progress=False, exports=exports, cpu_kernels=cpu_kernels, plugins=plugins, cuda_archs=cuda_archs)
    return path


@pytest.fixture(scope="session")
def engine_dir(demo_ckpt, tmp_path_factory):
    """Demo engine built with drop ratio 0.5 (layers 2, 4, 6), float32."""
    return _build(demo_ckpt, tmp_path_factory.mktemp("eng") / "demo", 0.5)


@pytest.fixture(scope="session")
def exported_dir(demo_ckpt, tmp_path_factory):
    """The same demo engine built with both TensorRT exports: vision/ (ONNX) and trtllm-checkpoint/."""
    return _build(demo_ckpt, tmp_path_factory.mktemp("export") / "demo", 0.5, EXPORTS)


@pytest.fixture(scope="session")
def engine(engine_dir):
    return Engine.load(engine_dir, device="cpu")


@pytest.fixture(scope="session")
def images():
    """Images whose anyres grids differ: 2x2 wide, 2x2 tall, 1x2, 3x1, 1x3 and a tiny one."""
    return [make_image(100, 150, 1), make_image(150, 100, 2), make_image(112, 224, 3),
            make_image(330, 100, 4), make_image(60, 300, 5), make_image(20, 30, 6)]
