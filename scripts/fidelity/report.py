"""Fidelity report: does PyramidDrop keep answers where naive dropping loses them, and does
training with it save time? Every figure is a mean over training seeds and test questions with a
95% bootstrap interval over both.

    python scripts/fidelity/report.py [--seeds 3] [--test 2000] [--out fidelity-results]

Trains the same small LLaVA-NeXT from scratch on the procedural task, normally and with the
pyramid schedule at drop 0.5, once per seed; saves each in Hugging Face layout, builds engines with
`build_engine`, and answers the test questions through the engine for every variant at matched
prefill FLOPs, with the model in float32 and in bfloat16. A finished training run or evaluation is
kept in --out and not repeated when the command is run again with the same settings, so a long
report can be stopped and resumed. Prints the table; writes report.json and accuracy_vs_flops.png.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from builder.convert.build import build_engine
from builder.convert.checkpoint import open_checkpoint
from builder.fidelity import intervals
from builder.fidelity.evaluate import correct, flops_of, prepare, variants
from builder.fidelity.task import dataset, kind
from builder.fidelity.train import TrainConfig, train
from builder.format.config import Limits, PyramidSchedule
from builder.runtime.engine import Engine

ARMS = {"normal": 0.0, "pdrop": 0.5}
DTYPES = ("float32", "bfloat16")
BATCH = 32


def trained(out: Path, arm: str, seed: int, base: dict, log) -> dict:
    """Train one arm at one seed, or reuse the run already in `out` with the same config."""
    cfg = TrainConfig(drop_ratio=ARMS[arm], seed=seed, **base)
    run = out / f"{arm}-seed{seed}"
    record = run / "training.json"
    if record.exists() and (kept := json.loads(record.read_text()))["config"] == asdict(cfg):
        return kept
    shutil.rmtree(run, ignore_errors=True)  # another config's model and its cached answers must not survive
    log(f"training {arm} (drop {cfg.drop_ratio}), seed {seed}, {cfg.steps} steps")
    begin = time.perf_counter()
    _, stats = train(cfg, run / "ckpt", log=log, base=out / f"stages-1-2-seed{seed}")
    engine_dir = run / "engine"
    ckpt = open_checkpoint(run / "ckpt")
    build_engine(ckpt, engine_dir, PyramidSchedule.create(ckpt.llm.n_layers, 0.5, cfg.layers),
                 Limits(BATCH, 256, 512), progress=False, force=True)
    result = {"config": asdict(cfg), "step_times": stats["step_times"], "answer_stage_s": sum(stats["step_times"]),
              "final_loss": float(np.mean(stats["losses"][-20:])), "wall_s": time.perf_counter() - begin}
    record.write_text(json.dumps(result))
    return result


def answers(out: Path, arm: str, seed: int, schedules: dict[str, PyramidSchedule], in_bf16: set[str], test,
            log) -> tuple[dict, float]:
    """{variant: {dtype: (questions,) right}} for one trained model, cached beside it, and the
    seconds spent answering; every variant in float32, those named in `in_bf16` also with the model
    in bfloat16."""
    run = out / f"{arm}-seed{seed}"
    cache = run / f"answers-{len(test)}.json"
    done, wall = json.loads(cache.read_text()) if cache.exists() else ({}, 0.0)
    prepared = None  # tokens and tiles do not depend on the dtype: prepared once, cast in the engine
    for dtype in DTYPES:
        todo = [n for n in schedules if dtype not in done.get(n, {}) and (dtype == "float32" or n in in_bf16)]
        if not todo:
            continue
        engine = Engine.load(run / "engine", device="cpu", dtype=dtype)
        prepared = prepared or prepare(engine, test)
        for name in todo:
            begin = time.perf_counter()
            right = correct(engine, prepared, test, schedules[name], BATCH)
            wall += time.perf_counter() - begin
            done.setdefault(name, {})[dtype] = right.astype(int).tolist()
            log(f"{arm} seed {seed} {dtype:8s} {name:55s} {100 * right.mean():5.1f}%")
            cache.write_text(json.dumps([done, wall]))
    return {name: {d: np.array(a, dtype=bool) for d, a in done[name].items()} for name in schedules}, wall


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    markers = {"none": "*", "pdrop": "o", "random": "x", "fastv": "s", "positions": "^", "pdrop-small": "D",
               "pdrop-trained": "P"}
    for family, marker in markers.items():
        pts = [r for r in rows if r["family"] == family]
        if not pts:
            continue
        x = [r["flops_rel"] for r in pts]
        y = [100 * r["accuracy"]["mean"] for r in pts]
        err = [[100 * (r["accuracy"]["mean"] - r["accuracy"]["low"]) for r in pts],
               [100 * (r["accuracy"]["high"] - r["accuracy"]["mean"]) for r in pts]]
        ax.errorbar(x, y, yerr=err, fmt=marker, label=family, markersize=7, capsize=3,
                    linestyle="-" if family in ("pdrop", "random", "pdrop-small") else "")
    ax.set_xlabel("prefill FLOPs relative to no drop (paper formula)")
    ax.set_ylabel("test accuracy (%), 95% interval")
    ax.set_title("accuracy vs prefill FLOPs (mean over seeds and questions)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="training runs per arm")
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--pretrain-steps", type=int, default=TrainConfig.pretrain_steps, help="stage 1: the tower")
    p.add_argument("--describe-steps", type=int, default=TrainConfig.describe_steps, help="stage 2: descriptions")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--train-examples", type=int, default=TrainConfig.train_examples)
    p.add_argument("--test", type=int, default=2000, help="test questions")
    p.add_argument("--dim", type=int, default=TrainConfig.dim)
    p.add_argument("--out", type=Path, default=Path("fidelity-results"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    begin = time.perf_counter()
    base = dict(steps=args.steps, pretrain_steps=args.pretrain_steps, describe_steps=args.describe_steps,
                batch_size=args.batch_size, train_examples=args.train_examples, dim=args.dim)
    seeds = range(args.seeds)
    runs = {arm: [trained(args.out, arm, s, base, log) for s in seeds] for arm in ARMS}

    test = dataset("test", args.test)
    engine = Engine.load(args.out / "normal-seed0" / "engine", device="cpu")
    cfg = engine.manifest.llm
    probe = prepare(engine, test[:1])[0]
    n_image, n_text = probe.n_image, probe.input_ids.numel() - probe.n_image
    layers = runs["normal"][0]["config"]["layers"]
    compared = variants(cfg.n_layers, n_image, cfg)
    served = {f"trained with PyramidDrop 0.5, served at drop {d}": PyramidSchedule.create(cfg.n_layers, d, layers)
              for d in (0.0, 0.5)}
    # bf16 changes which tokens tie in the rank: measured where a rank decides (no drop as the reference)
    in_bf16 = {v.name for v in compared if v.family in ("none", "pdrop")}
    normal, normal_s = zip(*(answers(args.out, "normal", s, {v.name: v.schedule for v in compared}, in_bf16, test,
                                     log) for s in seeds))
    dropped, dropped_s = zip(*(answers(args.out, "pdrop", s, served, set(served), test, log) for s in seeds))

    kinds = np.array([kind(ex.question) for ex in test])
    names = sorted(set(kinds))
    train_set = dataset("train", args.train_examples, 0)
    prior = {k: Counter(ex.answer for ex in train_set if kind(ex.question) == k) for k in names}
    prior_right = {k: np.array([ex.answer == prior[k].most_common(1)[0][0] for ex in test])[kinds == k] for k in names}

    def matrix(per_seed: list[dict], name: str, dtype: str = "float32") -> np.ndarray:
        return np.stack([a[name][dtype] for a in per_seed])  # (seeds, questions)

    rows = []
    reference = matrix(normal, "no drop")
    for family, per_seed, entries in (
            *((v.family, normal, [(v.name, v.schedule)]) for v in compared),
            ("pdrop-trained", dropped, list(served.items()))):
        for name, schedule in entries:
            m = matrix(per_seed, name)
            rows.append({"name": name, "family": family, "accuracy": intervals.mean(m).as_dict(),
                         "ratio": intervals.ratio(m, reference).as_dict(),
                         "bf16": intervals.mean(matrix(per_seed, name, "bfloat16")).as_dict()
                         if "bfloat16" in per_seed[0][name] else None,
                         "by_kind": {k: intervals.mean(m[:, kinds == k]).as_dict() for k in names},
                         **flops_of(cfg, schedule, n_image, n_text)})
    for r in rows:
        r["flops_rel"] = r["paper"] / rows[0]["paper"]

    def show(e: dict) -> str:
        return intervals.Estimate(**e).format()

    print(f"\nFidelity: {args.seeds} seeds per arm x {args.test} test questions ({n_image} image tokens); mean "
          f"and 95% bootstrap interval over seeds and questions; CPU, {torch.get_num_threads()} threads")
    print("| variant | accuracy | × no drop | bf16 accuracy | avg image tokens | prefill FLOPs × | "
          + " | ".join(names) + " |")
    print("| --- " * (6 + len(names)) + "|")
    print("| answer prior (most common answer of the kind) | | | | | | "
          + " | ".join(f"{100 * prior_right[k].mean():.1f}" for k in names) + " |")
    for r in rows:
        ratio = intervals.Estimate(**r["ratio"])
        bf16 = show(r["bf16"]) if r["bf16"] else ""
        print(f"| {r['name']} | {show(r['accuracy'])} | {ratio.format(1, 3)} | {bf16} | "
              f"{r['avg_image_tokens']:.1f} | {r['flops_rel']:.3f} | "
              + " | ".join(show(r["by_kind"][k]) for k in names) + " |")

    print("\nPaired differences in accuracy (points; 95% interval; * = separates from 0):")
    contrasts = [(f"PyramidDrop {r} − random {r}", (f"PyramidDrop {r}",), (f"random {r}",))
                 for r in (0.25, 0.5, 0.75)]
    fastv = next(v.name for v in compared if v.family == "fastv")
    contrasts += [(f"{fastv} − PyramidDrop 0.5", (fastv,), ("PyramidDrop 0.5",)),
                  (f"{fastv} − PyramidDrop 0.5, original positions", (fastv,),
                   ("PyramidDrop 0.5, original positions",)),
                  ("original positions − renumbered (PyramidDrop 0.5)", ("PyramidDrop 0.5, original positions",),
                   ("PyramidDrop 0.5",)),
                  ("PyramidDrop 0.5 − no drop", ("PyramidDrop 0.5",), ("no drop",))]
    contrasts += [(f"PyramidDrop 0.5, {dtype} − float32", ("PyramidDrop 0.5", dtype), ("PyramidDrop 0.5",))
                  for dtype in DTYPES[1:]]
    summary = {}
    for label, a, b in contrasts:  # a, b: (variant, dtype if not float32)
        diff = intervals.difference(matrix(normal, *a), matrix(normal, *b))
        summary[label] = diff.as_dict()
        print(f"  {label:60s} {diff.format()}{' *' if diff.separates_from(0) else ''}")

    steps = {arm: np.array([run["step_times"] for run in runs[arm]]) for arm in ARMS}
    step_ms = {arm: intervals.mean(1e3 * steps[arm]) for arm in ARMS}
    saving = intervals.estimate(1 - steps["pdrop"].mean() / steps["normal"].mean(),
                                1 - intervals.draws(steps["pdrop"]) / intervals.draws(steps["normal"]))
    trained_vs = intervals.difference(matrix(dropped, next(iter(served))), reference)
    print(f"\ntraining step: normal {step_ms['normal'].format(1, 0)} ms, with PyramidDrop 0.5 "
          f"{step_ms['pdrop'].format(1, 0)} ms: {saving.format()}% less")
    print(f"final accuracy at drop 0: normal {show(rows[0]['accuracy'])}, trained with PyramidDrop 0.5 "
          f"{show(rows[-2]['accuracy'])}; difference {trained_vs.format()} points")

    base_acc = intervals.Estimate(**rows[0]["accuracy"])
    pdrop05 = next(r for r in rows if r["name"] == "PyramidDrop 0.5")
    checks = {
        "normal model >= 90% overall": base_acc.mean >= 0.90,
        "every kind >= its prior + 15 points": all(
            rows[0]["by_kind"][k]["mean"] >= prior_right[k].mean() + 0.15 for k in names),
        "PyramidDrop 0.5 >= 98% of no drop": pdrop05["ratio"]["mean"] >= 0.98,
        "PyramidDrop beats random at 0.5 and 0.75 beyond the intervals": all(
            summary[f"PyramidDrop {r} − random {r}"]["low"] > 0 for r in (0.5, 0.75)),
        "training with PyramidDrop 0.5 saves >= 30% step time": saving.mean >= 0.30,
        "its accuracy is not worse (interval overlaps 0 or above)": trained_vs.high >= 0,
    }
    print("\ntargets:")
    for label, held in checks.items():
        print(f"  [{'met' if held else 'MISSED'}] {label}")
    wall = time.perf_counter() - begin
    train_s = sum(run["wall_s"] for arm in ARMS for run in runs[arm])
    answer_s = sum(normal_s) + sum(dropped_s)
    print(f"\ncompute behind this table: training {train_s / 60:.1f} min, answering {answer_s / 60:.1f} min "
          f"(summed over the runs, those reused from {args.out} included)")
    print(f"wall time of this command: {wall / 60:.1f} min")
    training = {arm: [{k: v for k, v in run.items() if k != "step_times"} for run in runs[arm]] for arm in ARMS}
    (args.out / "report.json").write_text(json.dumps({
        "args": {k: str(v) for k, v in vars(args).items()}, "training": training,
        "step_ms": {arm: e.as_dict() for arm, e in step_ms.items()}, "step_saving": saving.as_dict(),
        "prior": {k: float(prior_right[k].mean()) for k in names}, "rows": rows, "differences": summary,
        "targets": checks, "wall_s": wall, "train_s": train_s, "answer_s": answer_s}, indent=2))
    plot(rows, args.out / "accuracy_vs_flops.png")
    print(f"wrote {args.out / 'report.json'} and {args.out / 'accuracy_vs_flops.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
