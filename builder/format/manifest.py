"""The engine directory: a versioned manifest, converted weights and the processor files.

    manifest.json       format version, model configs, pyramid schedule, stored dtype and the precision
                        to run in, limits, source
                        fingerprint, sha256 of every other file, builder version
    manifest.sha256     sha256 of manifest.json (`sha256sum -c manifest.sha256` checks it too)
    llm.safetensors     decoder weights, fused wqkv and w13 (gate, up), (out, in) layout
    libpdrop_plugins.so the drop's CUDA kernels (when nvcc was there at build time)
    vision.safetensors  CLIP tower (`tower.*`), projector (`projector.*`), `image_newline`
    tokenizer.json, processor_config.json, chat_template.jinja, ...   as transformers saves them
    vision/, trtllm-checkpoint/   TensorRT deployment exports, when asked for (export_onnx.py,
                        export_trtllm.py); their files are checksummed like the others
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .config import Limits, LLMConfig, PyramidSchedule
from .errors import EngineError

FORMAT_VERSION = 2  # 2: manifest.sha256, limits.max_image_pixels
MANIFEST = "manifest.json"
DIGEST = "manifest.sha256"
# the TensorRT engines (`build --backend tensorrt-llm`): written after the manifest, never read by the runtime
UNLISTED = ("llm", "vision/model.engine")
LLM_WEIGHTS = "llm.safetensors"
VISION_WEIGHTS = "vision.safetensors"


@dataclass
class Manifest:
    llm: LLMConfig
    vision: dict  # vision_config dict + projector/feature-selection/anyres settings
    pyramid: PyramidSchedule
    dtype: str  # of the stored weights
    limits: Limits
    image_token_id: int
    eos_token_ids: list[int]
    source: dict
    files: dict[str, str]
    plugins: dict = field(default_factory=dict)  # {"library", "kernels", "archs", "abi_version"} or {"reason"}
    exports: dict = field(default_factory=dict)  # "onnx" / "trtllm-checkpoint" -> what was written and verified
    precision: str = "auto"  # what the build asked to run in: a dtype, or "auto" (network.precision)
    builder_version: str = __version__
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps({
            "format_version": self.format_version, "builder_version": self.builder_version,
            "llm": self.llm.to_dict(), "vision": self.vision, "pyramid": self.pyramid.to_dict(),
            "dtype": self.dtype, "precision": self.precision, "limits": self.limits.to_dict(),
            "image_token_id": self.image_token_id,
            "eos_token_ids": self.eos_token_ids, "source": self.source, "plugins": self.plugins,
            "exports": self.exports, "files": self.files}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        d = json.loads(text)
        if d.get("format_version") != FORMAT_VERSION:
            raise EngineError(f"engine format version {d.get('format_version')} is not supported by this "
                              f"builder (expects {FORMAT_VERSION}); rebuild the engine")
        return cls(llm=LLMConfig.from_dict(d["llm"]), vision=d["vision"], pyramid=PyramidSchedule(**d["pyramid"]),
                   dtype=d["dtype"], limits=Limits(**d["limits"]), image_token_id=d["image_token_id"],
                   eos_token_ids=d["eos_token_ids"], source=d["source"], files=d["files"], plugins=d["plugins"],
                   exports=d.get("exports", {}), precision=d.get("precision", "auto"),
                   builder_version=d["builder_version"], format_version=d["format_version"])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def checksum_dir(path: Path) -> dict[str, str]:
    """sha256 of every file but the manifest and its digest, keyed by its path relative to `path`
    ('vision/model.onnx')."""
    return {name: sha256_file(path / name) for name in _files(path)}


def _files(path: Path) -> list[str]:
    names = [p.relative_to(path).as_posix() for p in sorted(path.rglob("*")) if p.is_file()]
    return [n for n in names if n not in (MANIFEST, DIGEST) and not any(n == u or n.startswith(u + "/") for u in UNLISTED)]


def write_manifest(path: Path, manifest: Manifest) -> None:
    """manifest.json and, beside it, its sha256 in `sha256sum` format."""
    text = manifest.to_json()
    (path / MANIFEST).write_text(text)
    (path / DIGEST).write_text(f"{hashlib.sha256(text.encode()).hexdigest()}  {MANIFEST}\n")


def read_manifest(path: str | Path, verify: bool = True) -> Manifest:
    """Read and check an engine directory: the manifest against its digest, its version and, with
    verify, that every file is listed in it and matches its sha256."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise EngineError(f"not an engine directory (no {MANIFEST}): {path}")
    if not (path / DIGEST).is_file():
        raise EngineError(f"engine incomplete: {path / DIGEST} is missing; rebuild the engine")
    raw = (path / MANIFEST).read_bytes()
    if (path / DIGEST).read_text().split(" ")[0].strip() != hashlib.sha256(raw).hexdigest():
        raise EngineError(f"{path / MANIFEST} does not match {DIGEST}: it was changed after the build; "
                          "the engine is corrupt, rebuild it")
    try:
        manifest = Manifest.from_json(raw.decode())
    except (ValueError, KeyError, TypeError) as e:
        raise EngineError(f"corrupt {MANIFEST} in {path}: {e}") from None
    if verify:
        unlisted = sorted(set(_files(path)) - set(manifest.files))
        if unlisted:
            raise EngineError(f"engine file not in the manifest: {path / unlisted[0]}: the engine is corrupt; "
                              "rebuild it")
        for name, digest in manifest.files.items():
            f = path / name
            if not f.is_file():
                raise EngineError(f"engine file missing: {f}")
            if sha256_file(f) != digest:
                raise EngineError(f"checksum mismatch for {f}: the engine is corrupt; rebuild it")
    return manifest
