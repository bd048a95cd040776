"""Shared fixtures: the demo preset, its Hugging Face export and engines built from it, all on CPU."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from builder.convert.build import build_engine
from builder.convert.presets import preset_checkpoint, write_hf_checkpoint
from builder.format.config import EXPORTS, Limits, PyramidSchedule
from builder.runtime.engine import Engine
from builder.runtime.paged_kv import SequenceKV
from builder.runtime.pyramid import ImageSpan

DEMO_LAYERS = [2, 4, 6]


@contextmanager
def prefilled(engine, req):
    """The engine's prefill of one prepared request into blocks of its pool (room for the request's
    max_new_tokens): yields its embeddings (1, L, dim), final hidden states, stage stats and KV
    bookkeeping (for engine.decoder.step); the blocks go back after."""
    n_blocks = engine.scheduler.blocks_for(req)
    seq = SequenceKV.of(engine.pool.allocate(sum(n_blocks)), n_blocks)
    try:
        with torch.inference_mode():
            embeds, _ = engine.embed(req)
            span = ImageSpan.full(req.image_start, req.n_image, engine.device) if req.n_image else None
            h, stages = engine.llm.prefill(embeds, seq, span, req.schedule)
        yield embeds, h, stages, seq
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


def _build(ckpt, path, drop, exports=(), dtype="auto"):
    build_engine(ckpt, path, PyramidSchedule.create(8, drop, DEMO_LAYERS), Limits(8, 1536, 2048), dtype,
                 progress=False, exports=exports)
    return path


@pytest.fixture(scope="session")
def engine_dir(demo_ckpt, tmp_path_factory):
    """Demo engine built with drop ratio 0.5 (layers 2, 4, 6)."""
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
