"""Training from scratch on the task: the loss falls, with and without the drop; the trained model
saves as a Hugging Face checkpoint that the builder converts; and the training forward's drop is
the engine's drop (same logits)."""
from __future__ import annotations

import pytest
import torch

from builder.checkpoint import open_checkpoint
from builder.config import Limits, PyramidSchedule
from builder.convert import build_engine
from builder.engine import Engine
from builder.fidelity.task import dataset, render
from builder.fidelity.train import IMAGE, PROMPT, TrainConfig, encode, make_processor, train
from builder.sampling import SamplingParams
from conftest import prefill

LAYERS = [1, 2, 3]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("fid")
    cfg = TrainConfig(steps=30, batch_size=16, dim=128, n_layers=4, layers=LAYERS, train_examples=300, lr=3e-3,
                      drop_ratio=0.5)
    model, stats = train(cfg, out / "ckpt", log=None)
    return model, stats, out


def test_training_with_the_drop_lowers_the_loss(trained):
    _, stats, _ = trained
    losses = stats["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert stats["step_s"] > 0


def test_trained_checkpoint_converts_and_the_engine_matches_the_training_forward(trained):
    model, _, out = trained
    ckpt = open_checkpoint(out / "ckpt")
    build_engine(ckpt, out / "engine", PyramidSchedule.create(4, 0.5, LAYERS), Limits(2, 256, 512), progress=False)
    engine = Engine.load(out / "engine", device="cpu")
    processor = make_processor()
    for ex in dataset("test", 4):
        ids, pixels = encode(processor, [ex], with_answer=True)
        for drop in (0.0, 0.5):
            with torch.no_grad():
                trained_logits = model.answer_logits(ids, pixels, PyramidSchedule(LAYERS, drop))[0, 0]
            req = engine.prepare(PROMPT.format(question=ex.question), render(ex.items, IMAGE), SamplingParams(),
                                 drop_ratio=drop)
            assert torch.equal(req.input_ids, ids[0, :-2])  # the prompt is the training input minus answer, </s>
            _, h, _ = prefill(engine, req)
            with torch.inference_mode():
                served = engine.llm.output(h[0, -1])
            assert (served - trained_logits).abs().max().item() <= 1e-4
