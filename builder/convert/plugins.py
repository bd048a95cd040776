"""Compile plugins/ into shared libraries, cached by sources and flags, then compiler version: the CUDA
kernels (libpdrop_plugins.so, nvcc; without nvcc, one that any nvcc built from the same sources is taken
from the cache) and the CPU decode attention (libpdrop_cpu*.so, a C++ compiler, one library per x86
instruction set so that an engine runs on any CPU and fast on each)."""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from ..format.errors import ConfigError, PdropError

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"
LIBRARY = "libpdrop_plugins.so"
TRT_LIBRARY = "libpdrop_trt_plugin.so"
TRT_PLUGIN = {"name": "PdropRankCompact", "version": "1", "namespace": "pdrop"}
KERNELS = ["pdrop_score", "pdrop_select", "pdrop_compact", "pdrop_paged_decode"]
DEFAULT_ARCHS = ["80", "86", "89", "90"]
CPU_KERNELS = ["pdrop_cpu_paged_decode", "pdrop_cpu_linear"]
# instruction set (as torch.backends.cpu.get_cpu_capability names it, lower-cased) -> compiler flags
CPU_VARIANTS = ({"avx512": ["-march=x86-64-v4"], "avx2": ["-march=x86-64-v3"], "default": []}
                if platform.machine() in ("x86_64", "AMD64") else {"default": []})


def find_nvcc() -> str | None:
    for candidate in (shutil.which("nvcc"), os.environ.get("CUDA_HOME") and f"{os.environ['CUDA_HOME']}/bin/nvcc",
                      "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def find_tensorrt_include() -> Path | None:
    """TensorRT's C++ headers: $TENSORRT_INCLUDE, or $TENSORRT_ROOT/include."""
    for candidate in (os.environ.get("TENSORRT_INCLUDE"),
                      os.environ.get("TENSORRT_ROOT") and f"{os.environ['TENSORRT_ROOT']}/include"):
        if candidate and (Path(candidate) / "NvInferRuntime.h").is_file():
            return Path(candidate)
    return None


def _arch_number(arch: str) -> tuple[int, str]:
    """'90' -> (90, ''), '100a' -> (100, 'a'): for ordering architectures."""
    digits = arch.rstrip("abcdefghijklmnopqrstuvwxyz")
    return int(digits), arch[len(digits):]


def ptx_arch(archs: list[str]) -> str:
    """The newest of `archs`: its PTX is embedded too, so that the driver can compile the kernels
    for GPUs newer than any listed (SASS for sm_90 does not load on sm_100 or sm_120)."""
    return max(archs, key=_arch_number)


def check_archs(nvcc: str, archs: list[str]) -> None:
    """Refuse, in one line, an architecture the installed nvcc cannot compile for."""
    listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True).stdout.split()
    known = [a.removeprefix("compute_") for a in listed]
    unknown = [a for a in archs if a not in known]
    if unknown or not archs:
        raise ConfigError(f"--cuda-archs: this nvcc compiles for {', '.join(known)}; got {', '.join(archs) or 'none'}")


def nvcc_command(nvcc: str, archs: list[str], out: Path, tensorrt: Path | None = None) -> list[str]:
    """The kernels as a shared library (SASS for each arch, PTX for the newest); with TensorRT
    headers, the IPluginV3 wrapper linked in too."""
    newest = ptx_arch(archs)
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    sources = sorted((PLUGINS / "src").glob("*.cu"))
    extra = ["-isystem", str(tensorrt)] if tensorrt else []
    if tensorrt:
        sources.append(PLUGINS / "tensorrt" / "pdrop_trt_plugin.cu")
    return [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC,-Wall,-Wextra,-Werror", "-Werror",
            "all-warnings", f"-I{PLUGINS / 'include'}", *extra, *gencode, "-o", str(out), *map(str, sources)]


def _cache_dir(cache: Path | None) -> Path:
    return cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pdrop" / "plugins"


def _sources_digest(command: list[str]) -> str:
    """What a library is made of: the sources and the compiler flags, with the checkout's path left out, so
    that a copy of the tree on another machine finds the same cache entry."""
    digest = hashlib.sha256(" ".join(command).replace(str(PLUGINS), "plugins").encode())
    for f in sorted(PLUGINS.rglob("*")):
        if f.suffix in (".h", ".cu", ".cuh", ".cpp"):
            digest.update(f.name.encode() + f.read_bytes())
    return digest.hexdigest()[:16]


def _cache_target(cache: Path | None, command: list[str], compiler_version: str, name: str) -> Path:
    """<cache>/<sources and flags>/<compiler version>/<name>: the builds of one source tree by several
    compilers sit side by side, where a machine without a compiler can take any of them."""
    version = hashlib.sha256(compiler_version.encode()).hexdigest()[:16]
    return _cache_dir(cache) / _sources_digest(command) / version / name


def _compile(command: Callable[[Path], list[str]], target: Path, what: str, progress: bool) -> Path:
    """Run command(output path) into a temporary name and rename it to `target`, unless `target` is
    cached: an interrupted compile leaves nothing under the target's name."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    if progress:
        print(f"compiling {what} ...", file=sys.stderr, flush=True)
    start = time.monotonic()
    argv = command(tmp)
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:300])
        raise PdropError(f"{Path(argv[0]).name} failed to compile {what}: {first}")
    tmp.rename(target)
    if progress:
        print(f"compiled in {time.monotonic() - start:.1f} s (cached at {target.parent})", file=sys.stderr)
    return target


def _require_sources(header: str) -> None:
    if not (PLUGINS / "include" / header).is_file():
        raise PdropError(f"plugin sources not found at {PLUGINS}: building kernels needs a source checkout")


def prebuilt_plugins(archs: list[str] | None = None, cache: Path | None = None,
                     tensorrt: Path | None = None) -> Path | None:
    """The kernel library (or TensorRT plugin) for `archs` that some nvcc built from these very sources and
    flags into the cache (say, one scripts/gpu_prepare.sh filled and carried to a GPU machine without
    nvcc): the newest such build, or None."""
    command = nvcc_command("nvcc", archs or DEFAULT_ARCHS, Path("x"), tensorrt)
    builds = (_cache_dir(cache) / _sources_digest(command)).glob(f"*/{TRT_LIBRARY if tensorrt else LIBRARY}")
    return max(builds, key=lambda p: p.stat().st_mtime, default=None)


def compile_plugins(archs: list[str] | None = None, nvcc: str | None = None, cache: Path | None = None,
                    progress: bool = True, tensorrt: Path | None = None) -> Path:
    """Build (or take from the cache) the kernel library for `archs`, or with `tensorrt` headers the
    TensorRT plugin library; returns its path. Without nvcc, a prebuilt one (prebuilt_plugins)."""
    nvcc = nvcc or find_nvcc()
    _require_sources("pdrop_plugins.h")
    archs = archs or DEFAULT_ARCHS
    what = f"{'the TensorRT plugin' if tensorrt else 'CUDA kernels'} for sm_{', sm_'.join(archs)}"
    if nvcc is None:
        prebuilt = prebuilt_plugins(archs, cache, tensorrt)
        if prebuilt is None:
            raise PdropError(f"nvcc not found, and no {what} prebuilt from these sources in {_cache_dir(cache)}: "
                             "install the CUDA toolkit or set CUDA_HOME")
        return prebuilt
    check_archs(nvcc, archs)
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    target = _cache_target(cache, nvcc_command("nvcc", archs, Path("x"), tensorrt), version,
                           TRT_LIBRARY if tensorrt else LIBRARY)
    return _compile(lambda out: nvcc_command(nvcc, archs, out, tensorrt), target, what, progress)


def find_cxx() -> str | None:
    """The C++ compiler: $CXX, else g++ or clang++ on the PATH."""
    for candidate in (os.environ.get("CXX"), "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def cpu_library(variant: str) -> str:
    return "libpdrop_cpu.so" if variant == "default" else f"libpdrop_cpu_{variant}.so"


def cxx_command(cxx: str, variant: str, out: Path) -> list[str]:
    return [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-Wall", "-Wextra", "-Werror",
            *CPU_VARIANTS[variant], f"-I{PLUGINS / 'include'}", "-o", str(out), str(PLUGINS / "src" / "pdrop_cpu.cpp")]


def compile_cpu_kernels(cxx: str | None = None, cache: Path | None = None, progress: bool = True) -> dict[str, Path]:
    """Build (or take from the cache) the CPU kernel library for every instruction set in
    CPU_VARIANTS; returns variant -> path."""
    cxx = cxx or find_cxx()
    if cxx is None:
        raise PdropError("no C++ compiler found: install g++ or set CXX")
    _require_sources("pdrop_cpu.h")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    paths = {}
    for variant in CPU_VARIANTS:
        target = _cache_target(cache, cxx_command("c++", variant, Path("x")), version, cpu_library(variant))
        paths[variant] = _compile(lambda out: cxx_command(cxx, variant, out), target, f"CPU kernels ({variant})",
                                  progress)
    return paths
