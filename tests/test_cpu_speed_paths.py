"""The CPU fast paths: text decoded a token at a time (the kernels: test_cpu_kernels.py; the default
precision: test_precision.py)."""
from __future__ import annotations

import torch

from builder.runtime.sampling import SamplingParams
from builder.runtime.scheduler import Generation

CPU = torch.device("cpu")


def test_text_grows_a_token_at_a_time_and_equals_the_whole_decode(engine):
    """Multi-byte characters split over byte tokens are held back until whole; a stop word that
    straddles tokens is found; the deltas add up to the text, which equals decoding all tokens."""
    tok = engine.tokenizer
    answer = "héllo wörld, 你好 — done. STOP here"
    ids = tok.encode(answer, add_special_tokens=False)
    for stop, expected in (([], answer), (["ld, 你"], "héllo wör"), (["STOP", "—"], "héllo wörld, 你好 ")):
        gen = Generation(tok, SamplingParams(len(ids) + 5, stop=stop), {2}, len(ids) + 5, CPU, [])
        deltas = []
        for t in ids:
            deltas.append(gen.add(t))
            if gen.finish:
                break
        if not gen.finish:
            deltas.append(gen.add(2))  # EOS
        assert gen.text == expected and "".join(deltas) == expected and gen.finish == "stop"
        assert all("\ufffd" not in d for d in deltas)
    full = Generation(tok, SamplingParams(len(ids)), {2}, len(ids), CPU, [])
    assert "".join(full.add(t) for t in ids) == tok.decode(ids, skip_special_tokens=True)
    assert full.finish == "length"
