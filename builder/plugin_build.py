"""Compile plugins/ (the CUDA kernels) into libpdrop_plugins.so with nvcc, cached by source hash."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .errors import PdropError

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"
LIBRARY = "libpdrop_plugins.so"
KERNELS = ["pdrop_score", "pdrop_select", "pdrop_compact"]
DEFAULT_ARCHS = ["80", "86", "89", "90"]


def find_nvcc() -> str | None:
    for candidate in (shutil.which("nvcc"), os.environ.get("CUDA_HOME") and f"{os.environ['CUDA_HOME']}/bin/nvcc",
                      "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def nvcc_command(nvcc: str, archs: list[str], out: Path) -> list[str]:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC,-Wall,-Wextra,-Werror", "-Werror",
            "all-warnings", f"-I{PLUGINS / 'include'}", *gencode, "-o", str(out),
            *map(str, sorted((PLUGINS / "src").glob("*.cu")))]


def compile_plugins(archs: list[str] | None = None, nvcc: str | None = None, cache: Path | None = None,
                    progress: bool = True) -> Path:
    """Build (or take from the cache) the kernel library for `archs`; returns its path."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise PdropError("nvcc not found: install the CUDA toolkit or set CUDA_HOME")
    if not (PLUGINS / "include" / "pdrop_plugins.h").is_file():
        raise PdropError(f"plugin sources not found at {PLUGINS}: building kernels needs a source checkout")
    archs = archs or DEFAULT_ARCHS
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256(" ".join(nvcc_command("nvcc", archs, Path("x"))).encode() + version.encode())
    for f in sorted(PLUGINS.rglob("*")):
        if f.suffix in (".h", ".cu", ".cuh"):
            digest.update(f.name.encode() + f.read_bytes())
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pdrop" / "plugins"
    target = cache / digest.hexdigest()[:16] / LIBRARY
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    if progress:
        print(f"compiling CUDA kernels for sm_{', sm_'.join(archs)} ...", file=sys.stderr, flush=True)
    start = time.monotonic()
    done = subprocess.run(nvcc_command(nvcc, archs, tmp), capture_output=True, text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:300])
        raise PdropError(f"nvcc failed to compile the kernels: {first}")
    tmp.rename(target)
    if progress:
        print(f"compiled in {time.monotonic() - start:.1f} s (cached at {target.parent})", file=sys.stderr)
    return target
