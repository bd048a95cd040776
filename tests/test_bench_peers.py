"""The pdrop side of the peer benchmark: its worker answers the protocol the OpenVINO worker speaks
(the OpenVINO side needs a virtual environment of its own and is run by scripts/bench_peers.py only)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import make_image

WORKER = Path(__file__).resolve().parents[1] / "scripts" / "peers" / "pdrop_worker.py"


def test_pdrop_worker_answers_one_many_rss_and_precision(engine_dir, tmp_path):
    make_image(150, 100).save(tmp_path / "image.png")
    image = str(tmp_path / "image.png")
    cmds = [dict(op="one", image=image, question="What is it?", max_new_tokens=6, drop_ratio=0.0),
            dict(op="many", image=image, questions=["a?", "b?", "c?"], max_new_tokens=5, drop_ratio=0.5),
            dict(op="rss"), dict(op="precision")]
    out = subprocess.run([sys.executable, str(WORKER), str(engine_dir), "2", "float32", "0"], cwd=WORKER.parents[2],
                         input="".join(json.dumps(c) + "\n" for c in cmds), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    one, many, rss, precision = (json.loads(line) for line in out.stdout.splitlines())
    assert len(one["tokens"]) == 6 and one["ttft_s"] > 0 and one["decode_tok_s"] > 0  # EOS ignored, as the peer's
    assert one["prompt_tokens"] > 100  # the chat template around the image's tokens
    assert many["output_tokens"] == 15 and [len(t) for t in many["tokens"]] == [5, 5, 5]
    assert len(many["ttft_s"]) == 3 and 0 < max(many["ttft_s"]) <= many["wall_s"]
    assert rss["peak_rss_mb"] > 100
    assert precision["precision"] == "float32, KV cache torch.float32"
