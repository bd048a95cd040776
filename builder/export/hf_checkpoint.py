"""Our modules back to a Hugging Face LLaVA-NeXT checkpoint: the converter's plan, inverted.

Used to save models trained here (builder/fidelity) in the layout `builder build --model` reads.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..convert.build import llm_weight_plan, vision_weight_plan
from ..convert.checkpoint import expected_shapes


def hf_state(llm, vision, hf_config) -> dict[str, torch.Tensor]:
    """Canonical checkpoint tensors from a Transformer and a VisionEncoder (fused weights split)."""
    shapes = expected_shapes(hf_config)
    tied = "lm_head.weight" not in shapes
    ours = dict(llm.state_dict())
    ours |= {k.replace("tower.vision_model.", "tower."): v for k, v in vision.state_dict().items()}
    out = {}
    plans = list(llm_weight_plan(llm.cfg.n_layers, tied).items()) + list(vision_weight_plan(list(shapes)).items())
    for dst, srcs in plans:
        parts = ours[dst].split([shapes[s][0] for s in srcs]) if len(srcs) > 1 else [ours[dst]]
        for src, part in zip(srcs, parts):
            out.setdefault(src, part.detach().contiguous().clone())
    return out


def save_hf_checkpoint(llm, vision, hf_config, processor, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(out)
    tensors = {(n if n == "lm_head.weight" else "model." + n): t for n, t in hf_state(llm, vision, hf_config).items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    processor.save_pretrained(out)
    return out
