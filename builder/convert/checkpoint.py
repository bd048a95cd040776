"""Reading a LLaVA-NeXT checkpoint in Hugging Face layout (as transformers 4.x or 5.x saves it).

Every source, a directory or a built-in preset, becomes a `Checkpoint`: the transformers config,
the processor, and tensors by canonical name. Canonical names are transformers 5.x's without the
leading `model.`: `language_model.layers.0.self_attn.q_proj.weight`, `vision_tower.encoder...`,
`multi_modal_projector.linear_1.weight`, `image_newline`, `lm_head.weight`.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from ..format.config import LLMConfig
from ..format.errors import CheckpointError

# transformers 4.x wrote `language_model.model.*`, `language_model.lm_head.*` and
# `vision_tower.vision_model.*`; 5.x writes `model.language_model.*`, `lm_head.*`, `model.vision_tower.*`.
_RENAMES = [
    (re.compile(r"^model\.(vision_tower|multi_modal_projector|language_model|image_newline)"), r"\1"),
    (re.compile(r"^language_model\.model\."), "language_model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^vision_tower\.vision_model\."), "vision_tower."),
]


def canonical_name(name: str) -> str:
    for pattern, repl in _RENAMES:
        name = pattern.sub(repl, name)
    return name


@dataclass
class Checkpoint:
    hf_config: object  # transformers LlavaNextConfig
    processor: object  # transformers LlavaNextProcessor
    names: list[str]
    load: Callable[[str], torch.Tensor]  # canonical name -> tensor
    source: str
    fingerprint: str
    generation_config: dict | None = None

    @property
    def llm(self) -> LLMConfig:
        return LLMConfig.from_hf(self.hf_config.text_config)

    @property
    def sliding_window(self) -> int | None:
        return getattr(self.hf_config.text_config, "sliding_window", None)


def expected_shapes(hf_config) -> dict[str, tuple[int, ...]]:
    """Canonical tensor names and shapes of a LLaVA-NeXT model of this config (built on the meta device)."""
    from transformers import LlavaNextForConditionalGeneration

    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(hf_config)
    shapes = {canonical_name(k): tuple(v.shape) for k, v in model.state_dict().items()}
    if hf_config.text_config.tie_word_embeddings or getattr(hf_config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    return shapes


def validate_config(hf_config) -> None:
    if hf_config.model_type != "llava_next":
        raise CheckpointError(f"unsupported model '{hf_config.model_type}': pdrop builds LLaVA-NeXT (llava_next)")
    LLMConfig.from_hf(hf_config.text_config)
    if hf_config.vision_config.model_type != "clip_vision_model":
        raise CheckpointError(f"unsupported vision tower '{hf_config.vision_config.model_type}': pdrop runs CLIP")
    if not isinstance(hf_config.vision_feature_layer, int):
        raise CheckpointError("unsupported vision_feature_layer: a list of layers")


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a Hugging Face LLaVA-NeXT directory, checking config, weights and processor up front."""
    from transformers import AutoConfig, AutoProcessor

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"no config.json in {path}: not a Hugging Face checkpoint")
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"corrupt config.json in {path}: {e}") from None
    if raw.get("model_type") != "llava_next":
        raise CheckpointError(
            f"unsupported model '{raw.get('model_type') or raw.get('architectures')}': pdrop builds LLaVA-NeXT (llava_next)")
    try:
        hf_config = AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers raises many kinds on a bad config
        raise CheckpointError(f"cannot read config.json in {path}: {e}") from None
    validate_config(hf_config)

    files = sorted(path.glob("*.safetensors"))
    if not files:
        hint = " (PyTorch .bin weights are not supported; save with safetensors)" if any(path.glob("*.bin")) else ""
        raise CheckpointError(f"no safetensors weights in {path}{hint}")
    where: dict[str, tuple[Path, str]] = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as sf:
                for key in sf.keys():
                    where[canonical_name(key)] = (f, key)
        except Exception as e:
            raise CheckpointError(f"corrupt weights file {f.name}: {e}") from None

    shapes = expected_shapes(hf_config)
    missing = sorted(set(shapes) - set(where))
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {len(missing)} tensors, e.g. {missing[0]}")

    def load(name: str) -> torch.Tensor:
        f, key = where[name]
        try:
            with safe_open(f, framework="pt") as sf:
                t = sf.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"corrupt tensor {key} in {f.name}: {e}") from None
        if tuple(t.shape) != shapes[name]:
            raise CheckpointError(f"tensor {key} has shape {tuple(t.shape)}, config says {shapes[name]}")
        return t

    try:
        processor = AutoProcessor.from_pretrained(path)
    except Exception as e:
        raise CheckpointError(f"cannot load the tokenizer/processor in {path}: {e}") from None
    gen = path / "generation_config.json"
    return Checkpoint(
        hf_config=hf_config, processor=processor, names=sorted(shapes), load=load, source=str(path.resolve()),
        fingerprint=_fingerprint(path, files), generation_config=json.loads(gen.read_text()) if gen.is_file() else None)


def _fingerprint(path: Path, files: list[Path]) -> str:
    """sha256 over config.json and each weight file's name, size and safetensors header (no full read)."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(f.name.encode() + f.stat().st_size.to_bytes(8, "little") + fh.read(min(n, 1 << 24)))
    return "sha256:" + h.hexdigest()
