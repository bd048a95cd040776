"""The engine directory: a versioned manifest, converted weights and the processor files.

    manifest.json       format version, model configs, pyramid schedule, dtype, limits, source
                        fingerprint, sha256 of every other file, builder version
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

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LLM_WEIGHTS = "llm.safetensors"
VISION_WEIGHTS = "vision.safetensors"


@dataclass
class Manifest:
    llm: LLMConfig
    vision: dict  # vision_config dict + projector/feature-selection/anyres settings
    pyramid: PyramidSchedule
    dtype: str
    limits: Limits
    image_token_id: int
    eos_token_ids: list[int]
    source: dict
    files: dict[str, str]
    plugins: dict = field(default_factory=dict)  # {"library", "kernels", "archs", "abi_version"} or {"reason"}
    exports: dict = field(default_factory=dict)  # "onnx" / "trtllm-checkpoint" -> what was written and verified
    builder_version: str = __version__
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps({
            "format_version": self.format_version, "builder_version": self.builder_version,
            "llm": self.llm.to_dict(), "vision": self.vision, "pyramid": self.pyramid.to_dict(),
            "dtype": self.dtype, "limits": self.limits.to_dict(), "image_token_id": self.image_token_id,
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
                   exports=d.get("exports", {}),
                   builder_version=d["builder_version"], format_version=d["format_version"])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def checksum_dir(path: Path) -> dict[str, str]:
    """sha256 of every file but the manifest, keyed by its path relative to `path` ('vision/model.onnx')."""
    return {p.relative_to(path).as_posix(): sha256_file(p) for p in sorted(path.rglob("*"))
            if p.is_file() and p != path / MANIFEST}


def read_manifest(path: str | Path, verify: bool = True) -> Manifest:
    """Read and check an engine directory: manifest version and, with verify, every file's sha256."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise EngineError(f"not an engine directory (no {MANIFEST}): {path}")
    try:
        manifest = Manifest.from_json((path / MANIFEST).read_text())
    except (ValueError, KeyError, TypeError) as e:
        raise EngineError(f"corrupt {MANIFEST} in {path}: {e}") from None
    if verify:
        for name, digest in manifest.files.items():
            f = path / name
            if not f.is_file():
                raise EngineError(f"engine file missing: {f}")
            if sha256_file(f) != digest:
                raise EngineError(f"checksum mismatch for {f}: the engine is corrupt; rebuild it")
    return manifest
