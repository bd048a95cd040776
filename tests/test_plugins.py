"""The CUDA kernel library on a machine without a GPU: it compiles (warnings as errors), loads,
its C header agrees with the ctypes binding, and a build without nvcc finds it in the cache. The
kernels' numbers are checked in test_gpu_kernels.py, on a GPU."""
from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from conftest import header_prototypes

from builder.convert.plugins import (
    CPU_VARIANTS,
    PLUGINS,
    check_archs,
    compile_plugins,
    cpu_library,
    find_nvcc,
    nvcc_command,
)
from builder.format.errors import ConfigError, PdropError
from builder.runtime.engine import Engine
from builder.network.kernels import ABI_VERSION, SIGNATURES, STATUS_CUDA_ERROR, Kernels

pytestmark = pytest.mark.skipif(find_nvcc() is None, reason="nvcc (CUDA toolkit) not installed")


@pytest.fixture(scope="module")
def xdg_cache(tmp_path_factory) -> Path:
    """An empty $XDG_CACHE_HOME: the plugin cache is its pdrop/plugins."""
    return tmp_path_factory.mktemp("xdg")


@pytest.fixture(scope="module")
def library(xdg_cache):
    """Compiled for sm_80 and sm_90 into an empty cache, so nvcc really runs."""
    return compile_plugins(["80", "90"], cache=xdg_cache / "pdrop" / "plugins", progress=False)


def test_header_and_binding_agree():
    assert header_prototypes(PLUGINS / "include" / "pdrop_plugins.h") == SIGNATURES


def test_library_compiles_loads_and_answers_without_a_gpu(library):
    kernels = Kernels(library)
    lib = kernels.lib
    assert lib.pdrop_abi_version() == ABI_VERSION
    assert lib.pdrop_status_string(1) == b"invalid argument"
    assert lib.pdrop_score_workspace_size(2, 32, 3000, 5000) == (2 * 32 * 3000 + 32 * 5000) * 4
    # bad arguments are refused before any CUDA call
    assert lib.pdrop_select(None, None, None, None, None, 1, None, None) == 1
    assert lib.pdrop_compact(None, None, None, None, None, None, None, 1, 4, 16, None, None) == 1
    assert lib.pdrop_score(*([None] * 6), 1, 32, 5, 128, 100, 10, 0.1, 0, None, None, None) == 1  # 32 % 5 heads


def cuobjdump() -> str:
    """cuobjdump: the CUDA toolkit's, or the nvidia-cuda-cuobjdump wheel's (a test dependency)."""
    found = shutil.which("cuobjdump") or next(iter(Path(sysconfig.get_paths()["purelib"]).glob("nvidia/*/bin/cuobjdump")),
                                               None)
    assert found, "cuobjdump not found: pip install nvidia-cuda-cuobjdump"
    return str(found)


def test_library_embeds_ptx_of_the_newest_arch(library):
    """SASS for each listed arch, and PTX for the newest, which the driver compiles for newer GPUs."""
    ptx = subprocess.run([cuobjdump(), "--list-ptx", str(library)], capture_output=True, text=True, check=True).stdout
    elf = subprocess.run([cuobjdump(), "--list-elf", str(library)], capture_output=True, text=True, check=True).stdout
    assert re.findall(r"sm_(\d+)", ptx) == ["90"], ptx
    assert set(re.findall(r"sm_(\d+)", elf)) == {"80", "90"}, elf


def test_archs_are_checked_against_the_installed_nvcc():
    nvcc = find_nvcc()
    listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True).stdout
    newer = [a for a in ("100", "120") if f"compute_{a}" in listed]
    assert newer, f"nvcc lists no Blackwell arch: {listed}"
    check_archs(nvcc, ["80", *newer])  # accepted
    with pytest.raises(ConfigError, match="this nvcc compiles for"):
        check_archs(nvcc, ["80", "999"])
    command = " ".join(nvcc_command(nvcc, ["80", "100", "90"], Path("x")))
    assert "arch=compute_100,code=compute_100" in command and "code=compute_90" not in command


def test_library_is_cached_by_source_hash(library):
    assert compile_plugins(["80", "90"], cache=library.parents[2], progress=False) == library


def test_a_cuda_error_says_which(library):
    """Without a GPU every launch fails: the error names the CUDA error, not just "CUDA error"."""
    kernels = Kernels(library)
    status = kernels.lib.pdrop_select(*([8] * 5), 1, 8, None)  # non-null pointers reach the launch
    assert status == STATUS_CUDA_ERROR
    with pytest.raises(RuntimeError, match=r"^pdrop_select failed: CUDA error cudaError\w+: \w+"):
        kernels._check(status, "pdrop_select")


def test_without_nvcc_a_build_takes_the_library_prebuilt_from_the_same_sources(library, xdg_cache, demo_ckpt,
                                                                                  tmp_path, monkeypatch):
    """A GPU machine without nvcc, given a cache filled elsewhere (scripts/gpu_prepare.sh) and a copy of
    the tree at another path, ships the library that matches its sources and flags; else says why not."""
    from builder.convert import plugins

    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg_cache))
    monkeypatch.setattr(plugins, "find_nvcc", lambda: None)
    shutil.copytree(PLUGINS, tmp_path / "plugins")
    monkeypatch.setattr(plugins, "PLUGINS", tmp_path / "plugins")
    assert compile_plugins(["80", "90"], progress=False) == library
    from builder.convert.build import build_engine
    from builder.format.config import Limits, PyramidSchedule

    def build(path, archs, mode):
        return build_engine(demo_ckpt, path, PyramidSchedule.create(8, 0.5, [2, 4, 6]), Limits(2, 1536, 2048),
                            progress=False, plugins=mode, cuda_archs=archs, cpu_kernels="off")[0].plugins
    assert build(tmp_path / "a", ["80", "90"], "auto")["archs"] == ["80", "90"]
    assert (tmp_path / "a" / "libpdrop_plugins.so").read_bytes() == library.read_bytes()
    assert build(tmp_path / "b", ["80"], "auto") == {"library": None, "reason": "nvcc not found at build time",
                                                     "cpu": {"libraries": None, "reason": "disabled"}}
    with pytest.raises(PdropError, match="nvcc not found, and no CUDA kernels for sm_80 prebuilt from these sources"):
        build(tmp_path / "c", ["80"], "on")
    with open(tmp_path / "plugins" / "src" / "pdrop_kernels.cu", "a") as source:
        source.write("// edited\n")
    assert plugins.prebuilt_plugins(["80", "90"]) is None  # other sources: not that library


def test_engine_ships_the_kernels_and_cpu_runs_torch_ops(demo_ckpt, tmp_path, images, monkeypatch):
    monkeypatch.delenv("TENSORRT_ROOT", raising=False)
    monkeypatch.delenv("TENSORRT_INCLUDE", raising=False)
    from builder.convert.build import build_engine
    from builder.format.config import Limits, PyramidSchedule

    manifest, _ = build_engine(demo_ckpt, tmp_path / "e", PyramidSchedule.create(8, 0.5, [2, 4, 6]),
                               Limits(2, 1536, 2048), progress=False, plugins="on", cuda_archs=["80"])
    cpu = {"libraries": {v: cpu_library(v) for v in CPU_VARIANTS}, "kernels": ["pdrop_cpu_paged_decode", "pdrop_cpu_linear"],
           "abi_version": 1}
    assert manifest.plugins == {"library": "libpdrop_plugins.so", "kernels": ["pdrop_score", "pdrop_select",
                                "pdrop_compact", "pdrop_paged_decode"], "archs": ["80"], "ptx": "compute_80",
                                "abi_version": 3, "tensorrt_plugin": None, "cpu": cpu}
    assert "libpdrop_plugins.so" in manifest.files and all(f in manifest.files for f in cpu["libraries"].values())
    engine = Engine.load(tmp_path / "e", device="cpu")
    assert engine.llm.kernels is None and engine.llm.decode_kernels is not None  # the CPU library
    [r] = engine.generate(["<image>\nHi ASSISTANT:"], [images[0]], max_new_tokens=3)
    assert [s.tokens_kept for s in r.stages] == [84, 42, 21]
