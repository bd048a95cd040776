"""The fidelity report runs end to end on a tiny configuration (its accuracies are not asserted),
and a second run reuses the trained models and answers instead of repeating them."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fidelity" / "report.py"


def test_report_runs_end_to_end(tmp_path):
    command = [sys.executable, str(SCRIPT), "--seeds", "2", "--steps", "6", "--pretrain-steps", "2", "--describe-steps",
               "2", "--batch-size", "8", "--train-examples", "200", "--test", "16", "--dim", "64", "--out", str(tmp_path)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.glob("*-seed*")) == ["normal-seed0", "normal-seed1", "pdrop-seed0",
                                                              "pdrop-seed1", "stages-1-2-seed0", "stages-1-2-seed1"]
    assert out.stderr.count("stages 1-2 from") == 2  # each seed's second arm starts from its first's stage 2
    report = json.loads((tmp_path / "report.json").read_text())
    families = [r["family"] for r in report["rows"]]
    assert families.count("pdrop") == 3 and families.count("random") == 3 and families.count("pdrop-small") == 3
    assert {"none", "fastv", "positions", "pdrop-trained"} <= set(families)
    for r in report["rows"]:
        assert (r["bf16"] is not None) == (r["family"] in ("none", "pdrop", "pdrop-trained"))
        for figure in (r["accuracy"], r["bf16"] or r["accuracy"], *r["by_kind"].values()):
            assert 0.0 <= figure["low"] <= figure["mean"] <= figure["high"] <= 1.0
        assert 0 < r["flops_rel"] <= 1.0
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["no drop"]["flops_rel"] == 1.0
    fastv = next(r for r in report["rows"] if r["family"] == "fastv")
    assert abs(fastv["paper"] / rows["PyramidDrop 0.5"]["paper"] - 1) < 0.05  # FLOPs-matched
    small = [r["avg_image_tokens"] / 88 for r in report["rows"] if r["family"] == "pdrop-small"]
    assert [round(x, 1) for x in small] == [round(1 / 3, 1), round(2 / 9, 1), round(1 / 9, 1)]
    assert report["step_ms"]["normal"]["mean"] > 0 and report["step_ms"]["pdrop"]["mean"] > 0
    assert report["train_s"] > 0 and report["answer_s"] > 0 and "compute behind this table" in out.stdout
    assert "training step: normal" in out.stdout and "targets:" in out.stdout
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "training" not in again.stderr and again.stdout.split("wall time")[0] == out.stdout.split("wall time")[0]
    with Image.open(tmp_path / "accuracy_vs_flops.png") as img:
        assert img.format == "PNG"
