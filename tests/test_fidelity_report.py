"""The fidelity report runs end to end on a tiny configuration (its numbers are not asserted)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fidelity" / "report.py"


def test_report_runs_end_to_end(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--steps", "6", "--pretrain-steps", "2", "--batch-size", "8", "--train-examples",
                          "200", "--test", "16", "--dim", "64", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    families = [r["family"] for r in report["rows"]]
    assert families.count("pdrop") == 3 and families.count("random") == 3 and families.count("pdrop-small") == 3
    assert {"none", "fastv", "positions", "pdrop-trained"} <= set(families)
    for r in report["rows"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and 0 < r["flops_rel"] <= 1.0
    rows = {r["name"]: r for r in report["rows"]}
    assert rows["no drop"]["flops_rel"] == 1.0
    fastv = next(r for r in report["rows"] if r["family"] == "fastv")
    assert abs(fastv["paper"] / rows["PyramidDrop 0.5"]["paper"] - 1) < 0.05  # FLOPs-matched
    small = [r["avg_image_tokens"] / 88 for r in report["rows"] if r["family"] == "pdrop-small"]
    assert [round(x, 1) for x in small] == [round(1 / 3, 1), round(2 / 9, 1), round(1 / 9, 1)]
    assert report["training"]["normal"]["step_ms"] > 0 and report["training"]["pdrop"]["step_ms"] > 0
    assert "training step: normal" in out.stdout
    with Image.open(tmp_path / "accuracy_vs_flops.png") as img:
        assert img.format == "PNG"
