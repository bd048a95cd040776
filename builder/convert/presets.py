"""Built-in random-weight LLaVA-NeXT models, created by code and never downloaded.

`demo` is tiny (answers are noise: it shows the machinery); the others have the shapes of real
checkpoints for benchmarks. Every tensor is drawn from a generator seeded by (seed, name), so a
preset is the same on every machine and independent of the order tensors are read in.
"""
from __future__ import annotations

import math
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..format.errors import CheckpointError
from .checkpoint import Checkpoint, expected_shapes, validate_config

CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14)
PINPOINTS_336 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
VICUNA_CHAT = ("{% for m in messages %}{% if m['role'] == 'system' %}{% for c in m['content'] %}{{ c['text'] }}"
               "{% endfor %} {% endif %}{% endfor %}"
               "{% if messages[0]['role'] != 'system' %}A chat between a curious human and an artificial intelligence "
               "assistant. The assistant gives helpful, detailed, and polite answers to the human's questions. "
               "{% endif %}{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
               "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
               "{% endfor %} {% elif m['role'] == 'assistant' %}ASSISTANT: {{ m['content'][0]['text'] }}</s>"
               "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")

PRESETS: dict[str, dict] = {
    "demo": dict(
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    image_size=112, patch_size=14),
        text=dict(model_type="llama", vocab_size=264, hidden_size=128, intermediate_size=352, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
        pinpoints=[[112, 224], [224, 112], [224, 224], [336, 112], [112, 336]], dtype="float32"),
    # Real image geometry (336 px tiles, up to 2,928 image tokens) with a small LLM: CPU benchmarks.
    "llava-next-small": dict(
        vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                    image_size=336, patch_size=14),
        text=dict(model_type="llama", vocab_size=32064, hidden_size=1024, intermediate_size=2816,
                  num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096),
        pinpoints=PINPOINTS_336, dtype="float32"),
    # The checkpoint the CPU peer benchmark runs (scripts/bench_peers.py): a Llama-style LLM small
    # enough for decode to be overhead-bound, GQA as in Mistral, the real 336-px image geometry.
    "llava-next-peer": dict(
        vision=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
                    image_size=336, patch_size=14),
        text=dict(model_type="llama", vocab_size=32064, hidden_size=768, intermediate_size=2048,
                  num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=4096),
        pinpoints=PINPOINTS_336, dtype="float32"),
    "llava-next-vicuna-7b": dict(
        vision=CLIP_L_336,
        text=dict(model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
        pinpoints=PINPOINTS_336, dtype="bfloat16"),
    "llava-next-mistral-7b": dict(
        vision=CLIP_L_336,
        text=dict(model_type="mistral", vocab_size=32064, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                  rope_parameters={"rope_theta": 1e6, "rope_type": "default"}, sliding_window=None),
        pinpoints=PINPOINTS_336, dtype="bfloat16"),
}


def demo_tokenizer():
    """Byte-level tokenizer built locally: 256 byte tokens plus the specials LLaVA needs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<image>", "<pad>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", padding_side="right")


def preset_processor(spec: dict):
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tile = spec["vision"]["image_size"]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=spec["pinpoints"])
    # num_additional_image_tokens=1 counts CLIP's CLS, as the llava-hf processors do.
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=demo_tokenizer(),
                              patch_size=spec["vision"]["patch_size"], vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, chat_template=VICUNA_CHAT)


def preset_config(spec: dict, image_token_id: int):
    from transformers import AutoConfig, CLIPVisionConfig, LlavaNextConfig

    text = dict(spec["text"])
    text_config = AutoConfig.for_model(text.pop("model_type"), **text, bos_token_id=1, eos_token_id=2,
                                       pad_token_id=None, dtype=spec["dtype"])
    config = LlavaNextConfig(vision_config=CLIPVisionConfig(**spec["vision"]), text_config=text_config,
                             image_token_index=image_token_id, image_grid_pinpoints=spec["pinpoints"])
    config.dtype = spec["dtype"]
    return config


def _init(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if name.endswith("bias"):
        return torch.zeros(shape)
    if len(shape) == 1 and ("norm" in name or "layrnorm" in name):
        return torch.ones(shape)
    # Unit-variance activations keep a random model's logits well separated, so greedy decoding is stable.
    tables = ("embed_tokens.weight", "position_embedding.weight")
    fan_in = 1 if len(shape) == 1 or name.endswith(tables) else math.prod(shape[1:])
    return torch.randn(shape, generator=g) / fan_in ** 0.5


def preset_checkpoint(name: str, seed: int = 0) -> Checkpoint:
    if name not in PRESETS:
        raise CheckpointError(f"unknown preset '{name}'; presets: {', '.join(PRESETS)}")
    spec = PRESETS[name]
    processor = preset_processor(spec)
    config = preset_config(spec, processor.image_token_id)
    validate_config(config)
    shapes = expected_shapes(config)
    return Checkpoint(hf_config=config, processor=processor, names=sorted(shapes),
                      load=lambda n: _init(n, shapes[n], seed), source=f"preset:{name}",
                      fingerprint=f"preset:{name}:seed={seed}",
                      generation_config={"bos_token_id": 1, "eos_token_id": 2})


def write_hf_checkpoint(ckpt: Checkpoint, out: str | Path) -> Path:
    """Save a checkpoint in transformers 5.x's LLaVA-NeXT layout (config, safetensors, processor)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.hf_config.save_pretrained(out)
    tensors = {(n if n == "lm_head.weight" else "model." + n): ckpt.load(n).contiguous() for n in ckpt.names}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    ckpt.processor.save_pretrained(out)
    return out
