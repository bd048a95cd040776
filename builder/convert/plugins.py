"""Compile plugins/ (the CUDA kernels) into libpdrop_plugins.so with nvcc, cached by source hash."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..format.errors import ConfigError, PdropError

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"
LIBRARY = "libpdrop_plugins.so"
TRT_LIBRARY = "libpdrop_trt_plugin.so"
TRT_PLUGIN = {"name": "PdropRankCompact", "version": "1", "namespace": "pdrop"}
KERNELS = ["pdrop_score", "pdrop_select", "pdrop_compact"]
DEFAULT_ARCHS = ["80", "86", "89", "90"]


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
        sources.append(PLUGINS / "tensorrt" / "pdrop_trt_plugin.cpp")
    return [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC,-Wall,-Wextra,-Werror", "-Werror",
            "all-warnings", f"-I{PLUGINS / 'include'}", *extra, *gencode, "-o", str(out), *map(str, sources)]


def compile_plugins(archs: list[str] | None = None, nvcc: str | None = None, cache: Path | None = None,
                    progress: bool = True, tensorrt: Path | None = None) -> Path:
    """Build (or take from the cache) the kernel library for `archs`, or with `tensorrt` headers the
    TensorRT plugin library; returns its path."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise PdropError("nvcc not found: install the CUDA toolkit or set CUDA_HOME")
    if not (PLUGINS / "include" / "pdrop_plugins.h").is_file():
        raise PdropError(f"plugin sources not found at {PLUGINS}: building kernels needs a source checkout")
    archs = archs or DEFAULT_ARCHS
    check_archs(nvcc, archs)
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256(" ".join(nvcc_command("nvcc", archs, Path("x"), tensorrt)).encode() + version.encode())
    for f in sorted(PLUGINS.rglob("*")):
        if f.suffix in (".h", ".cu", ".cuh", ".cpp"):
            digest.update(f.name.encode() + f.read_bytes())
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pdrop" / "plugins"
    target = cache / digest.hexdigest()[:16] / (TRT_LIBRARY if tensorrt else LIBRARY)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    if progress:
        what = "the TensorRT plugin" if tensorrt else "CUDA kernels"
        print(f"compiling {what} for sm_{', sm_'.join(archs)} ...", file=sys.stderr, flush=True)
    start = time.monotonic()
    done = subprocess.run(nvcc_command(nvcc, archs, tmp, tensorrt), capture_output=True, text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:300])
        raise PdropError(f"nvcc failed to compile the kernels: {first}")
    tmp.rename(target)
    if progress:
        print(f"compiled in {time.monotonic() - start:.1f} s (cached at {target.parent})", file=sys.stderr)
    return target
