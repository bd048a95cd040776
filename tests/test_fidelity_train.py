"""Training from scratch on the task: the loss falls, with and without the drop; the trained model
saves as a Hugging Face checkpoint that the builder converts; and the training forward's drop is
the engine's drop (same logits)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import prefill

from builder.convert.build import build_engine
from builder.convert.checkpoint import open_checkpoint
from builder.fidelity.pretrain import patch_cells, patch_labels, pretrain_tower
from builder.fidelity.task import COLOURS, dataset, render
from builder.fidelity.train import IMAGE, PROMPT, Model, TrainConfig, encode, make_config, make_processor, train
from builder.format.config import Limits, PyramidSchedule
from builder.runtime.engine import Engine
from builder.runtime.sampling import SamplingParams

LAYERS = [1, 2, 3]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("fid")
    cfg = TrainConfig(steps=30, batch_size=16, dim=128, n_layers=4, layers=LAYERS, train_examples=300, lr=3e-3,
                      drop_ratio=0.5, pretrain_steps=3, describe_steps=3)
    model, stats = train(cfg, out / "ckpt", log=None, base=out / "base")
    return model, stats, out, cfg


def test_runs_that_differ_only_in_the_drop_share_stages_1_and_2(trained):
    _, _, out, cfg = trained
    lines = []
    train(replace(cfg, drop_ratio=0.0, steps=2), log=lines.append, base=out / "base")
    assert lines[0] == f"stages 1-2 from {out / 'base' / 'stages-1-2.safetensors'}"
    assert not any(line.startswith(("tower", "describe")) for line in lines)
    lines.clear()
    train(replace(cfg, drop_ratio=0.0, steps=2, describe_steps=2), log=lines.append, base=out / "base")
    assert lines[0].startswith("tower step")  # another stage 2: trained again


def test_training_with_the_drop_lowers_the_loss(trained):
    _, stats, _, _ = trained
    losses = stats["losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert stats["step_times"] and min(stats["step_times"]) > 0


def test_trained_checkpoint_converts_and_the_engine_matches_the_training_forward(trained):
    model, _, out, _ = trained
    ckpt = open_checkpoint(out / "ckpt")
    build_engine(ckpt, out / "engine", PyramidSchedule.create(4, 0.5, LAYERS), Limits(2, 256, 512), "float32",
                 progress=False)
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


def test_tower_pretraining_labels_each_patch_with_the_cell_under_it():
    """Independent of the cell arithmetic: a patch is labelled with a colour exactly when its pixels
    show that colour, in the base tile and in every crop."""
    processor = make_processor()
    cells = patch_cells(56, IMAGE, 14)
    assert cells.shape == (5, 16, 2)
    mean = torch.tensor(processor.image_processor.image_mean)[:, None, None]
    std = torch.tensor(processor.image_processor.image_std)[:, None, None]
    palette = torch.tensor([[0, 0, 0]] + list(COLOURS.values()), dtype=torch.float)
    for ex in dataset("val", 12):
        pixels = processor.image_processor([render(ex.items, IMAGE)], return_tensors="pt").pixel_values[0]
        rgb = ((pixels * std + mean) * 255).unfold(2, 14, 14).unfold(3, 14, 14)  # (tiles, 3, 4, 4, 14, 14)
        rgb = rgb.permute(0, 2, 3, 4, 5, 1).reshape(5, 16, 14 * 14, 3)
        labels = patch_labels(ex, cells)
        for t in range(5):
            for p in range(16):
                shown = {c for c in range(1, 5) if ((rgb[t, p] - palette[c]).abs().max(-1).values < 40).any()}
                assert shown == ({int(labels[t, p, 0])} - {0}), (ex, t, p)
        # where in its tile: in the base tile (the whole image) that is the patch's grid cell
        assert torch.equal(labels[0, :, 2:4], cells[0])
        assert labels[:, :, 2:4].unique(dim=1).shape == (5, 16, 2)  # every tile: each place once
        assert labels[:, :, 4].tolist() == [[0] * 16] + [[1] * 16] * 4  # base tile, then crops


def test_tower_pretraining_learns_the_patch_labels():
    processor = make_processor()
    model = Model(make_config(processor, TrainConfig(dim=64, n_layers=2)))
    examples = dataset("train", 200)
    before = pretrain_tower(model.vision, processor.image_processor, examples, IMAGE, 1, 16, 1e-3, 0, log=None)
    after = pretrain_tower(model.vision, processor.image_processor, examples, IMAGE, 40, 16, 1e-3, 0, log=None)
    assert after > before + 0.2
