"""The CPU fast paths: the default precision, weights packed for oneDNN, text decoded a token at a time."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from builder.runtime import engine as engine_module
from builder.runtime.engine import resolve_dtype
from builder.runtime.packed_linear import PackedLinear, pack_linears
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


def test_packed_linear_equals_linear_and_keeps_its_weight():
    g = torch.Generator().manual_seed(0)
    for bias in (False, True):
        linear = nn.Linear(96, 200, bias=bias)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(200, 96, generator=g))
        packed = PackedLinear(linear)
        assert torch.equal(packed.weight, linear.weight)  # unpacked bit for bit
        for shape in ((1, 96), (8, 96), (1, 300, 96)):  # decode rows, prefill
            x = torch.randn(*shape, generator=g)
            with torch.inference_mode():
                assert torch.allclose(packed(x), linear(x), rtol=1e-5, atol=1e-4)


def test_an_engine_on_cpu_runs_packed_linears(engine):
    linears = [m for m in [*engine.llm.modules(), *engine.vision.modules()] if isinstance(m, (nn.Linear, PackedLinear))]
    assert linears and all(isinstance(m, PackedLinear) for m in linears)


def test_bf16_is_packed_only_where_the_cpu_computes_it():
    model = pack_linears(nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16))
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert isinstance(model[0], PackedLinear) == native


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


def test_a_packed_module_saves_what_nn_linear_saves():
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4, bias=False))
    want = {k: v.clone() for k, v in model.state_dict().items()}
    got = pack_linears(model).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
