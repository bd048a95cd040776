"""Fidelity report: does PyramidDrop keep answers where naive dropping loses them, and does
training with it save time? One command; about 36 minutes on 2 CPU cores with the defaults.

    python scripts/fidelity/report.py [--steps 1500] [--test 500] [--out fidelity-results]

Trains the same small LLaVA-NeXT twice from scratch on the procedural task (normally, and with
the pyramid schedule at drop 0.5), saves both in Hugging Face layout, builds engines with
`build_engine`, and measures test accuracy through the engine for every variant against its
prefill FLOPs. Prints a table; writes report.json and accuracy_vs_flops.png.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from builder.convert.build import build_engine
from builder.convert.checkpoint import open_checkpoint
from builder.fidelity.evaluate import accuracy, flops_of, variants
from builder.fidelity.task import dataset, render
from builder.fidelity.train import IMAGE, PROMPT, TrainConfig, train
from builder.format.config import Limits, PyramidSchedule
from builder.runtime.engine import Engine
from builder.runtime.sampling import SamplingParams


def build(ckpt_dir: Path, out: Path, layers: list[int]) -> Engine:
    ckpt = open_checkpoint(ckpt_dir)
    build_engine(ckpt, out, PyramidSchedule.create(ckpt.llm.n_layers, 0.5, layers), Limits(8, 256, 512),
                 progress=False, force=True)
    return Engine.load(out, device="cpu")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"none": "*", "pdrop": "o", "random": "x", "fastv": "s", "positions": "^", "pdrop-small": "D",
               "pdrop-trained": "P"}
    for family, marker in markers.items():
        pts = [r for r in rows if r["family"] == family]
        if pts:
            ax.plot([r["flops_rel"] for r in pts], [100 * r["accuracy"] for r in pts], marker, label=family,
                    markersize=8, linestyle="-" if family in ("pdrop", "random", "pdrop-small") else "")
    ax.set_xlabel("prefill FLOPs relative to no drop (paper formula)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy vs prefill FLOPs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--pretrain-steps", type=int, default=TrainConfig.pretrain_steps, help="stage 1: the tower")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--train-examples", type=int, default=20000)
    p.add_argument("--test", type=int, default=500, help="test examples")
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--out", type=Path, default=Path("fidelity-results"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    base = dict(steps=args.steps, pretrain_steps=args.pretrain_steps, batch_size=args.batch_size,
                train_examples=args.train_examples, dim=args.dim)
    runs = {}
    for name, drop in (("normal", 0.0), ("pdrop", 0.5)):
        log(f"training {name} (drop {drop}) for {args.steps} steps")
        start = time.perf_counter()
        cfg = TrainConfig(drop_ratio=drop, **base)
        _, stats = train(cfg, args.out / f"{name}-ckpt", log=log)
        runs[name] = {"step_ms": 1e3 * stats["step_s"], "train_s": time.perf_counter() - start,
                      "final_loss": sum(stats["losses"][-20:]) / len(stats["losses"][-20:]), "layers": cfg.layers}

    test = dataset("test", args.test)
    engine = build(args.out / "normal-ckpt", args.out / "normal-engine", runs["normal"]["layers"])
    cfg = engine.manifest.llm
    probe = engine.prepare(PROMPT.format(question=test[0].question), render(test[0].items, IMAGE), SamplingParams())
    n_image, n_text = probe.n_image, probe.input_ids.numel() - probe.n_image
    rows = []

    def measure(name: str, family: str, eng: Engine, schedule: PyramidSchedule) -> None:
        acc = accuracy(eng, test, schedule)
        rows.append({"name": name, "family": family, "accuracy": acc.pop("all"), "by_kind": acc,
                     **flops_of(cfg, schedule, n_image, n_text)})
        log(f"{name:60s} {100 * rows[-1]['accuracy']:5.1f}%")

    for v in variants(cfg.n_layers, n_image, cfg):
        measure(v.name, v.family, engine, v.schedule)
    trained = build(args.out / "pdrop-ckpt", args.out / "pdrop-engine", runs["pdrop"]["layers"])
    for drop in (0.0, 0.5):
        measure(f"trained with PyramidDrop, served at drop {drop}", "pdrop-trained", trained,
                PyramidSchedule.create(cfg.n_layers, drop, runs["pdrop"]["layers"]))
    base_flops = rows[0]["paper"]
    for r in rows:
        r["flops_rel"] = r["paper"] / base_flops

    ref = rows[0]["accuracy"]
    print(f"\nFidelity on {args.test} test questions ({n_image} image tokens), CPU {torch.get_num_threads()} threads")
    kinds = list(rows[0]["by_kind"])
    print(f"{'variant':62} {'accuracy':>8} {'x no-drop':>9} {'avg img tok':>11} {'FLOPs x':>7} "
          + " ".join(f"{k:>6}" for k in kinds))
    for r in rows:
        print(f"{r['name']:62} {100 * r['accuracy']:7.1f}% {r['accuracy'] / ref if ref else 0:>9.3f} "
              f"{r['avg_image_tokens']:>11.1f} {r['flops_rel']:>7.3f} "
              + " ".join(f"{100 * r['by_kind'].get(k, 0):5.1f}%" for k in kinds))
    n, d = runs["normal"], runs["pdrop"]
    print(f"\ntraining step: normal {n['step_ms']:.0f} ms, with PyramidDrop {d['step_ms']:.0f} ms "
          f"({100 * (1 - d['step_ms'] / n['step_ms']):.0f}% less); final loss {n['final_loss']:.3f} vs "
          f"{d['final_loss']:.3f}")
    (args.out / "report.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                      "training": runs, "rows": rows}, indent=2))
    plot(rows, args.out / "accuracy_vs_flops.png")
    print(f"wrote {args.out / 'report.json'} and {args.out / 'accuracy_vs_flops.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
