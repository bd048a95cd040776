"""The CPU kernels of a decode step (plugins/src/pdrop_cpu.cpp): built for every instruction set,
bound as the header says, equal to plain references, and what an engine runs on a CPU; the compiled
(torch.compile) step equals the plain one."""
from __future__ import annotations

import shutil

import pytest
import torch
from conftest import _build, header_prototypes, prefilled
from reference import paged_decode_reference, random_paged_batch
from torch import nn

from builder.convert.plugins import CPU_VARIANTS, PLUGINS, compile_cpu_kernels, cpu_library
from builder.runtime.decode import Decoder
from builder.runtime.engine import Engine
from builder.network.kernel_linear import MAX_ROWS, KernelLinear, use_kernel_linears
from builder.network.kernels import CPU_SIGNATURES, CpuKernels
from builder.runtime.paged_kv import DecodeBatch
from builder.runtime.sampling import SamplingParams

PROMPT = "USER: <image>\nWhich shape is red? ASSISTANT:"


@pytest.fixture(scope="module")
def libraries(tmp_path_factory):
    """Every variant compiled into an empty cache (warnings as errors), so the compiler really runs."""
    return compile_cpu_kernels(cache=tmp_path_factory.mktemp("cache"), progress=False)


def runnable(libraries) -> dict:
    """The variants this CPU can run (an AVX-512 build would stop the process here with SIGILL)."""
    order = ["default", "avx2", "avx512"]
    mine = torch.backends.cpu.get_cpu_capability().lower()
    top = order.index(mine) if mine in order else 0
    return {v: p for v, p in libraries.items() if order.index(v) <= top}


@pytest.fixture(scope="module")
def kernels(libraries):
    """The library an engine loads on this CPU (engine.load_cpu_kernels' choice)."""
    return CpuKernels(libraries.get(torch.backends.cpu.get_cpu_capability().lower(), libraries["default"]))


def test_every_instruction_set_compiles_and_the_header_matches_the_binding(libraries):
    assert set(libraries) == set(CPU_VARIANTS) and all(p.name == cpu_library(v) for v, p in libraries.items())
    assert header_prototypes(PLUGINS / "include" / "pdrop_cpu.h") == CPU_SIGNATURES
    assert CpuKernels(libraries["default"]).lib.pdrop_cpu_abi_version() == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv, block_size", [(12, 4, 16), (8, 8, 7), (6, 2, 64)])
def test_paged_decode_equals_the_plain_reference(kernels, dtype, heads, kv, block_size):
    """Ragged rows (one empty), blocks scattered over the pool, tables wider than the rows."""
    gen = torch.Generator().manual_seed(heads + block_size)
    q, k_pool, v_pool, tables, num_keys = random_paged_batch(gen, 5, heads, kv, 64, block_size, dtype)
    got = kernels.paged_decode(q, k_pool, v_pool, tables, num_keys)
    want = paged_decode_reference(q, k_pool, v_pool, tables, num_keys)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert got.dtype == dtype and (got.float() - want).abs().max().item() < tol
    assert not got[num_keys == 0].any()


def test_both_instruction_sets_give_the_same_attention(libraries):
    gen = torch.Generator().manual_seed(1)
    batch = random_paged_batch(gen, 3, 12, 4, 64, 16, torch.float32, max_keys=3000)
    assert len(runnable(libraries)) >= 1
    outs = [CpuKernels(p).paged_decode(*batch) for p in runnable(libraries).values()]
    assert all((o - outs[0]).abs().max().item() < 1e-5 for o in outs)


def test_bad_arguments_are_refused_not_read(kernels):
    gen = torch.Generator().manual_seed(2)
    q, k_pool, v_pool, tables, num_keys = random_paged_batch(gen, 2, 4, 4, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="invalid argument"):  # a row longer than its table
        kernels.paged_decode(q, k_pool, v_pool, tables, torch.tensor([tables.shape[1] * 4 + 1, 1]))
    with pytest.raises(ValueError, match="invalid argument"):  # 5 query heads over 4 KV heads
        kernels.paged_decode(q[:, :1].expand(2, 5, 8).contiguous(), k_pool, v_pool, tables, num_keys)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.paged_decode(q.transpose(0, 1), k_pool, v_pool, tables, num_keys)
    with pytest.raises(ValueError, match="invalid argument"):
        kernels.linear(torch.zeros(2, 8), torch.zeros(4, 9))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_linear_equals_nn_linear_and_keeps_its_state(kernels, dtype):
    g = torch.Generator().manual_seed(0)
    for out_features in (200, 203):  # rows of the weight in fours, and three left over
        linear = nn.Linear(96, out_features, bias=False).to(dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(out_features, 96, generator=g))
        want_state = {k: v.clone() for k, v in linear.state_dict().items()}
        plain = nn.Linear(96, out_features, bias=False).to(dtype)
        plain.load_state_dict(want_state)
        use_kernel_linears(linear, kernels)
        assert type(linear) is KernelLinear and linear.weight.data_ptr() == linear.state_dict()["weight"].data_ptr()
        for shape in ((1, 96), (3, 96), (MAX_ROWS, 1, 96), (1, 300, 96)):  # decode rows, prefill
            x = torch.randn(*shape, generator=g).to(dtype)
            with torch.inference_mode():
                got, want = linear(x), plain(x)
            tol = 1e-4 if dtype == torch.float32 else 0.05 * want.float().abs().max().item() / 8
            assert got.shape == want.shape and (got.float() - want.float()).abs().max().item() < tol
        assert all(torch.equal(v, want_state[k]) for k, v in linear.state_dict().items())


def test_an_engine_on_cpu_decodes_in_its_kernels(engine, monkeypatch):
    """Every linear of the LLM is a KernelLinear and a decode step calls the kernels; the vision
    tower (biases, prefill-sized inputs) keeps nn.Linear."""
    assert isinstance(engine.llm.decode_kernels, CpuKernels)
    linears = [m for m in engine.llm.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is KernelLinear for m in linears)
    calls = []
    for name in ("linear", "paged_decode"):
        real = getattr(engine.llm.decode_kernels, name)
        monkeypatch.setattr(engine.llm.decode_kernels, name, lambda *a, _n=name, _r=real: calls.append(_n) or _r(*a))
    prompt = "USER: please count from one to ten, slowly and clearly ASSISTANT:"  # more rows than MAX_ROWS
    engine.generate([prompt], max_new_tokens=2)  # a prefill and one step
    n_layers = len(engine.llm.layers)
    # the step: four linears a layer and the head; the prefill: the head on its last token
    assert calls.count("paged_decode") == n_layers and calls.count("linear") == 4 * n_layers + 2


def test_an_engine_built_without_cpu_kernels_answers_the_same(demo_ckpt, engine, tmp_path, images):
    path = _build(demo_ckpt, tmp_path / "plain", 0.5, cpu_kernels="off")
    with pytest.warns(UserWarning, match="no CPU kernels"):
        plain = Engine.load(path)
    assert plain.llm.decode_kernels is None and plain.manifest.plugins["cpu"]["reason"] == "disabled"
    prompts, pictures = [PROMPT, "USER: count to ten ASSISTANT:"], [images[0], None]
    got = engine.generate(prompts, pictures, max_new_tokens=12, drop_ratio=0.5)
    want = plain.generate(prompts, pictures, max_new_tokens=12, drop_ratio=0.5)
    assert [r.token_ids for r in got] == [r.token_ids for r in want] and len(got[0].token_ids) == 12


def test_the_compiled_step_equals_the_plain_step_with_one_graph_for_every_batch(engine, images):
    """torch.compile over the decode step, the kernels ops of its graph: compiled once at warm-up (as
    an engine loads), then the same logits as the plain step for one row and for two of other lengths
    and stage widths, with no recompile."""
    compiled = Decoder(engine.llm, compiled=True)
    with torch.inference_mode():
        compiled.warm_up()
    image_req = engine.prepare(PROMPT, images[0], SamplingParams(max_new_tokens=4), drop_ratio=0.5)
    text_req = engine.prepare("hi", None, SamplingParams(max_new_tokens=4), drop_ratio=0.0)
    with prefilled(engine, image_req) as (*_, seq), prefilled(engine, text_req) as (*_, short), torch.inference_mode():
        assert short.n_blocks == [1] * len(short.n_blocks) and len(set(seq.n_blocks)) > 1
        for seqs in ([seq], [short, seq]):
            tokens = torch.tensor([5, 7][:len(seqs)])
            want = engine.llm.decode(tokens, DecodeBatch.of(seqs, len(seqs), engine.device))
            with torch._dynamo.config.patch(error_on_recompile=True):
                got = compiled.run(tokens, seqs)
            assert (got - want).abs().max().item() < 1e-4


def test_a_cpu_library_that_does_not_load_falls_back_to_torch_ops(engine_dir, tmp_path):
    """A library built for another architecture (here: not a library at all) costs speed, not answers."""
    shutil.copytree(engine_dir, tmp_path / "e")
    for name in Engine.load(engine_dir).manifest.plugins["cpu"]["libraries"].values():
        (tmp_path / "e" / name).write_bytes(b"not a shared library")
    with pytest.warns(UserWarning, match="cannot load the plugin library"):
        foreign = Engine.load(tmp_path / "e", verify=False)
    assert foreign.llm.decode_kernels is None
    assert len(foreign.generate(["USER: hi ASSISTANT:"], max_new_tokens=3)[0].token_ids) > 0
