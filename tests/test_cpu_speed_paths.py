"""The CPU fast paths: the default precision, text decoded a token at a time (the kernels: test_cpu_kernels.py)."""
from __future__ import annotations

import pytest
import torch

from builder.runtime import engine as engine_module
from builder.runtime.engine import resolve_dtype
from builder.runtime.sampling import SamplingParams
from builder.runtime.scheduler import Generation

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("native_bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_cpu_default_precision_is_what_openvino_picks(monkeypatch, native_bf16, expected):
    monkeypatch.setattr(engine_module, "cpu_has_bf16", lambda: native_bf16)
    for stored in ("float32", "bfloat16", "float16"):
        assert resolve_dtype(None, stored, CPU) == expected
        assert resolve_dtype("auto", stored, CPU) == expected
        assert resolve_dtype(None, stored, CUDA) == getattr(torch, stored)  # a GPU runs the engine's own
        assert resolve_dtype("float16", stored, CPU) == torch.float16  # asked for: always that


def test_an_unknown_dtype_is_refused():
    with pytest.raises(engine_module.InputError, match="unsupported dtype 'int8'"):
        resolve_dtype("int8", "float32", CPU)


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
