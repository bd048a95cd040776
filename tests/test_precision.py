"""The precision policy (network.precision) on both kinds of CPU, whatever this one is, and the
default path held to the fp32 reference with stated tolerances.

The exactness tests elsewhere pin float32 (conftest builds with an explicit --dtype float32, which
every CPU honours). Here the capability check is replaced to stand for the other kind of CPU.
"""
from __future__ import annotations

import json

import pytest
import torch
import tritonclient.grpc as grpcclient
from conftest import _build, prefill
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

from builder.cli import main
from builder.client.grpc import infer, request_inputs
from builder.format.errors import InputError
from builder.network import precision
from builder.runtime.engine import Engine
from builder.network.precision import resolve_dtype
from builder.runtime.sampling import SamplingParams
from builder.serve.launcher import TritonServer
from builder.serve.package import package_repo

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
# bf16 keeps 8 bits of mantissa: through the demo model's 8 layers its logits stay within 3% of
# their largest magnitude of fp32's, and its kept sets share at least 85% of fp32's
BF16_LOGITS_TOLERANCE = 0.03
BF16_KEPT_OVERLAP = 0.85
FP16_LOGITS_TOLERANCE = 0.005  # 11 bits of mantissa


@pytest.fixture
def bf16_cpu(monkeypatch):
    """This process as a CPU with native bf16 (AVX512-BF16 or AMX)."""
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)


@pytest.fixture
def avx2_cpu(monkeypatch):
    """This process as a CPU without native bf16."""
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)


@pytest.fixture(scope="module")
def auto_dir(demo_ckpt, tmp_path_factory):
    """The demo engine as `build` makes it by default (--dtype auto: the runtime chooses)."""
    return _build(demo_ckpt, tmp_path_factory.mktemp("auto") / "demo", 0.5, dtype="auto")


@pytest.mark.parametrize("native_bf16, cpu_default", [(True, torch.bfloat16), (False, torch.float32)])
def test_what_runs_for_each_build_request_and_device(monkeypatch, native_bf16, cpu_default):
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: native_bf16)
    for stored in ("float32", "bfloat16", "float16"):
        # build --dtype auto: a CPU's own choice, a GPU the stored dtype
        assert resolve_dtype(None, "auto", stored, CPU) == cpu_default
        assert resolve_dtype("auto", "auto", stored, CPU) == cpu_default
        assert resolve_dtype(None, "auto", stored, CUDA) == getattr(torch, stored)
        # build --dtype X: X on every device
        assert resolve_dtype(None, stored, stored, CPU) == getattr(torch, stored)
        assert resolve_dtype("auto", stored, stored, CUDA) == getattr(torch, stored)
        # run/package/load --dtype Y: Y over either
        assert resolve_dtype("float16", stored, stored, CPU) == torch.float16
        assert resolve_dtype("float32", "auto", stored, CPU) == torch.float32


def test_an_unknown_dtype_is_refused_whether_asked_for_or_recorded():
    with pytest.raises(InputError, match="unsupported dtype 'int8'"):
        resolve_dtype("int8", "auto", "float32", CPU)
    with pytest.raises(InputError, match="unsupported dtype 'fp8'"):
        resolve_dtype(None, "fp8", "float32", CPU)


def test_the_default_build_runs_what_each_kind_of_cpu_picks(auto_dir, engine_dir, monkeypatch):
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(precision, "cpu_has_bf16", lambda native=native: native)
        assert Engine.load(auto_dir, device="cpu").pool.k.dtype == expected
        assert Engine.load(engine_dir, device="cpu").pool.k.dtype == torch.float32  # built --dtype float32


def test_a_float32_build_gives_hf_fp32_greedy_tokens_through_run_on_a_bf16_cpu(engine_dir, hf_dir, images, bf16_cpu,
                                                                              tmp_path, capsys):
    image = tmp_path / "img.png"
    images[0].save(image)
    assert main(["run", "--engine", str(engine_dir), "--image", str(image), "--prompt", PROMPT, "--json",
                 "--max-new-tokens", "10", "--drop-ratio", "0"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dtype"] == "float32"
    model = LlavaNextForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    enc = AutoProcessor.from_pretrained(hf_dir)(text=PROMPT, images=images[0], return_tensors="pt")
    with torch.no_grad():
        theirs = model.generate(**enc, max_new_tokens=10, do_sample=False)[0, enc.input_ids.shape[1]:].tolist()
    assert out["token_ids"] == theirs[:len(out["token_ids"])] and len(out["token_ids"]) >= 1


def _logits_and_kept(engine, image, drop):
    req = engine.prepare(PROMPT, image, SamplingParams(), drop_ratio=drop)
    _, h, stages = prefill(engine, req)
    with torch.inference_mode():
        return engine.llm.output(h)[0, -1].float(), stages


@pytest.mark.parametrize("dtype, tolerance", [("bfloat16", BF16_LOGITS_TOLERANCE), ("float16", FP16_LOGITS_TOLERANCE)])
def test_reduced_precision_is_within_its_tolerance_of_fp32(auto_dir, engine, images, dtype, tolerance):
    reduced = Engine.load(auto_dir, device="cpu", dtype=dtype)
    for image in images[:3]:
        want, _ = _logits_and_kept(engine, image, 0.0)
        got, _ = _logits_and_kept(reduced, image, 0.0)
        assert (got - want).abs().max().item() <= tolerance * want.abs().max().item()


def test_bf16_keeps_nearly_the_image_tokens_fp32_keeps(auto_dir, engine, images, bf16_cpu):
    fast = Engine.load(auto_dir, device="cpu")
    assert fast.dtype == torch.bfloat16
    for image in images[:3]:
        _, want = _logits_and_kept(engine, image, 0.5)
        _, got = _logits_and_kept(fast, image, 0.5)
        for w, g in zip(want, got):
            assert g.tokens_kept == w.tokens_kept
            shared = len(set(g.kept) & set(w.kept))
            assert shared >= BF16_KEPT_OVERLAP * w.tokens_kept, (w.layer, shared, w.tokens_kept)


def test_float16_on_a_cpu_generates_a_batch_on_torch_ops(auto_dir, images):
    with pytest.warns(UserWarning, match="float16 decode runs on torch ops"):
        engine = Engine.load(auto_dir, device="cpu", dtype="float16")
    results = engine.generate([PROMPT, "USER: hello ASSISTANT:"], [images[1], None],
                              params=[SamplingParams(6, end_id=-1)] * 2)
    assert [len(r.token_ids) for r in results] == [6, 6]


@pytest.fixture(scope="module")
def bf16_server(auto_dir, tmp_path_factory):
    repo = package_repo(auto_dir, tmp_path_factory.mktemp("bf16") / "models", dtype="bfloat16").parent
    with TritonServer(repo, log_path=tmp_path_factory.mktemp("log") / "triton.log") as s:
        yield s


def test_a_request_served_in_bf16_equals_the_engine_run_in_bf16(bf16_server, auto_dir, images):
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    c = grpcclient.InferenceServerClient(bf16_server.grpc_url)
    config = c.get_model_config("pdrop", as_json=True)["config"]
    assert config["parameters"]["dtype"]["string_value"] == "bfloat16"
    answer = infer(c, "pdrop", request_inputs(PROMPT, 12, images[2]))
    c.close()
    assert answer.error is None
    [expected] = Engine.load(auto_dir, device="cpu", dtype="bfloat16").generate([PROMPT], [images[2]],
                                                                                max_new_tokens=12)
    assert answer.ids == expected.token_ids and answer.text == expected.text
    text = urllib.request.urlopen(bf16_server.metrics_url, timeout=10).read().decode()
    info = [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == "pdrop_engine_info"]
    assert [(s.labels["device"], s.labels["dtype"], s.value) for s in info] == [("cpu", "bfloat16", 1.0)]


def test_package_refuses_an_unknown_dtype(auto_dir, tmp_path):
    with pytest.raises(Exception, match="unsupported dtype 'half'"):
        package_repo(auto_dir, tmp_path / "models", dtype="half")
    assert not (tmp_path / "models").exists()
