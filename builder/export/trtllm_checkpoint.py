"""The LLM as a TensorRT-LLM checkpoint: `trtllm-checkpoint/config.json` + `rank0.safetensors`.

Layout and config keys follow NVIDIA/TensorRT-LLM docs/source/architecture/checkpoint.md and
tensorrt_llm/models/llama/config.py (LLaMAConfig.from_hugging_face); tensor names follow
tensorrt_llm/models/llama/convert.py, whose param_name_map sends HF `mlp.gate_proj` to `mlp.fc` and
`mlp.up_proj` to `mlp.gate`, matching tensorrt_llm/layers/mlp.py (GatedMLP: proj(silu(fc(x)) * gate(x))).
Our engine's wqkv already stacks q, k, v rows as TensorRT-LLM's `attention.qkv` does; only w13
(gate, up) is cut in two. The pyramid schedule rides along as an extra key TensorRT-LLM ignores.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..format.config import LLMConfig, PyramidSchedule
from ..format.manifest import LLM_WEIGHTS
from ..network.model import Transformer

CHECKPOINT_DIR = "trtllm-checkpoint"
RANK0 = "rank0.safetensors"  # tp_size = pp_size = 1: one rank
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}


def weight_plan(n_layers: int) -> dict[str, tuple[str, int, int]]:
    """TensorRT-LLM name -> (engine tensor, block, blocks): the engine tensor's rows cut into
    `blocks` equal blocks, block number `block` taken."""
    plan = {"transformer.vocab_embedding.weight": ("tok_embeddings.weight", 0, 1)}
    for i in range(n_layers):
        src, dst = f"layers.{i}.", f"transformer.layers.{i}."
        plan[dst + "input_layernorm.weight"] = (src + "attention_norm.weight", 0, 1)
        plan[dst + "attention.qkv.weight"] = (src + "attention.wqkv.weight", 0, 1)
        plan[dst + "attention.dense.weight"] = (src + "attention.wo.weight", 0, 1)
        plan[dst + "post_layernorm.weight"] = (src + "ffn_norm.weight", 0, 1)
        plan[dst + "mlp.fc.weight"] = (src + "feed_forward.w13.weight", 0, 2)  # gate_proj, under the SiLU
        plan[dst + "mlp.gate.weight"] = (src + "feed_forward.w13.weight", 1, 2)  # up_proj
        plan[dst + "mlp.proj.weight"] = (src + "feed_forward.w2.weight", 0, 1)
    plan["transformer.ln_f.weight"] = ("norm.weight", 0, 1)
    plan["lm_head.weight"] = ("output.weight", 0, 1)
    return plan


def checkpoint_config(llm: LLMConfig, text_model_type: str, dtype: str, schedule: PyramidSchedule) -> dict:
    return {
        "architecture": ARCHITECTURES[text_model_type], "dtype": dtype, "logits_dtype": "float32",
        "vocab_size": llm.vocab_size, "hidden_size": llm.dim, "num_hidden_layers": llm.n_layers,
        "num_attention_heads": llm.n_heads, "num_key_value_heads": llm.n_kv_heads, "head_size": llm.head_dim,
        "intermediate_size": llm.intermediate_size, "hidden_act": "silu", "norm_epsilon": llm.norm_eps,
        "position_embedding_type": "rope_gpt_neox", "rotary_base": llm.rope_theta, "rotary_scaling": None,
        "max_position_embeddings": llm.max_position_embeddings, "tie_word_embeddings": llm.tie_word_embeddings,
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
        # TensorRT-LLM's Llama network does not drop tokens: recorded for a network that would
        "pyramid_drop": schedule.to_dict(),
    }


def write_checkpoint(engine_dir: Path, llm: LLMConfig, text_model_type: str, dtype: str,
                     schedule: PyramidSchedule) -> dict:
    """Write `trtllm-checkpoint/` from the engine's llm.safetensors; returns what the manifest records."""
    engine = load_file(engine_dir / LLM_WEIGHTS)
    tensors = {name: engine[src].chunk(blocks)[block].contiguous()
               for name, (src, block, blocks) in weight_plan(llm.n_layers).items()}
    out = engine_dir / CHECKPOINT_DIR
    out.mkdir()
    save_file(tensors, out / RANK0, metadata={"format": "pt"})
    config = checkpoint_config(llm, text_model_type, dtype, schedule)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return {"path": CHECKPOINT_DIR, "architecture": config["architecture"], "tensors": len(tensors)}


def read_checkpoint(path: str | Path, max_seq_len: int) -> Transformer:
    """A checkpoint written by write_checkpoint back into our Transformer (the round-trip check)."""
    path = Path(path)
    c = json.loads((path / "config.json").read_text())
    cfg = LLMConfig(vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
                    n_heads=c["num_attention_heads"], n_kv_heads=c["num_key_value_heads"], head_dim=c["head_size"],
                    intermediate_size=c["intermediate_size"], rope_theta=c["rotary_base"],
                    norm_eps=c["norm_epsilon"], max_position_embeddings=c["max_position_embeddings"],
                    tie_word_embeddings=c["tie_word_embeddings"])
    weights = load_file(path / RANK0)
    blocks: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    for name, (src, block, _) in weight_plan(cfg.n_layers).items():
        blocks[src][block] = weights[name]
    state = {src: torch.cat([parts[b] for b in sorted(parts)]) for src, parts in blocks.items()}
    model = Transformer(cfg, max_seq_len).to(state["output.weight"].dtype)
    model.load_state_dict(state)
    return model.eval()
