"""Train a small LLaVA-NeXT from scratch on the procedural task, with or without PyramidDrop.

The model is the engine's own modules (CLIP-style tower + projector + anyres packing, Llama-style
decoder) in training mode; with a drop ratio the pyramid schedule is active in the forward pass,
as the paper trains. The result is saved in Hugging Face LLaVA-NeXT layout, so
`python -m builder build --model DIR` converts it like any real checkpoint.
"""
from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..convert.build import vision_spec
from ..export.hf_checkpoint import save_hf_checkpoint
from ..format.config import LLMConfig, PyramidSchedule
from ..network import pyramid
from ..network.model import Transformer
from ..network.vision import VisionEncoder, merge
from .pretrain import pretrain_tower
from .task import COLOURS, NUMBERS, PREFIXES, SHAPES, Example, dataset, descriptions, render

TILE, IMAGE = 56, 112  # 56-px tiles of 4 x 4 patches; a 112-px image is a 2 x 2 grid: 88 image tokens
PROMPT = "USER: <image>\n{question} ASSISTANT:"
AFTER_QUERY = 2  # in training inputs the answer word and </s> follow the last instruction token


@dataclass
class TrainConfig:
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    drop_ratio: float = 0.0  # > 0: train with the pyramid schedule active
    layers: list[int] = field(default_factory=lambda: [2, 4, 6])
    train_examples: int = 20000
    seed: int = 0
    dim: int = 192
    n_layers: int = 8
    pretrain_steps: int = 200  # stage 1: the tower on per-patch labels (see pretrain.py)
    describe_steps: int = 300  # stage 2: describing whole scenes (see train)
    parts: int = 4  # a step's batch is `parts` groups of one question length each (see batches)

    def __post_init__(self):
        if not 1 <= self.parts <= self.batch_size:
            raise ValueError(f"parts must be in [1, batch_size {self.batch_size}], got {self.parts}")


def task_words() -> list[str]:
    words = set("USER ASSISTANT What colour is the Which shape How many shapes are there in row column Describe "
                "image".split())
    words |= set(COLOURS) | set(SHAPES) | set(NUMBERS) | {"nothing"} | {str(i) for i in range(1, 5)}
    words |= {w for p in PREFIXES for w in p.replace(".", " ").split()}
    return sorted(words) + ["?", ":", "."]


def make_processor():
    """A word-level tokenizer (each answer is one token) and a 56-px-tile LLaVA-NeXT processor."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlavaNextProcessor, PreTrainedTokenizerFast
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    specials = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(specials + task_words())}, unk_token="<unk>"))
    tok.add_special_tokens(specials)  # matched before the whitespace split, even when glued together
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>")
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
        image_grid_pinpoints=[[TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE]])
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


def make_config(processor, cfg: TrainConfig):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    heads = cfg.dim // 32
    text = LlamaConfig(vocab_size=len(processor.tokenizer), hidden_size=cfg.dim, intermediate_size=cfg.dim * 8 // 3,
                       num_hidden_layers=cfg.n_layers, num_attention_heads=heads,
                       num_key_value_heads=heads // 2 if heads % 2 == 0 else heads,  # GQA where it divides
                       max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                              image_size=TILE, patch_size=14)
    return LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=processor.image_token_id,
                           image_grid_pinpoints=processor.image_processor.image_grid_pinpoints)


class Model(torch.nn.Module):
    def __init__(self, hf_config):
        super().__init__()
        self.hf_config = hf_config
        llm_cfg = LLMConfig.from_hf(hf_config.text_config)
        self.llm = Transformer(llm_cfg, llm_cfg.max_position_embeddings)
        self.vision = VisionEncoder(vision_spec(hf_config), llm_cfg.dim)
        # Embeddings at Llama's std 0.02, so that text does not drown the image features (std ~0.25)
        # as a unit-variance init would; linear layers keep PyTorch's larger default, because at
        # std 0.02 attention starts so flat that even 64 examples are not fitted in 100 steps.
        torch.nn.init.normal_(self.llm.tok_embeddings.weight, std=0.02)
        torch.nn.init.normal_(self.vision.image_newline, std=0.02)

    def answer_logits(self, ids: torch.Tensor, pixels: torch.Tensor, schedule: PyramidSchedule,
                      targets: int = AFTER_QUERY) -> torch.Tensor:
        """ids (B, L) = prompt + answer + </s>, the answer and </s> `targets` tokens; pixels (B, patches,
        3, TILE, TILE) -> logits (B, targets, V) at the positions that predict them."""
        batch = ids.shape[0]
        feats = self.vision.features(pixels.flatten(0, 1))  # (B * patches, side^2, dim)
        feats = feats.view(batch, -1, *feats.shape[1:])
        packed = torch.stack([self.vision.pack(f, (IMAGE, IMAGE))[0] for f in feats])  # (B, N, dim)
        where = (ids[0] == self.hf_config.image_token_id).nonzero()[:, 0]
        start, n = int(where[0]), where.numel()
        embeds = merge(self.llm.tok_embeddings(ids), start, packed)
        h = forward_train(self.llm, embeds, start, n, schedule, targets)
        return self.llm.output(h[:, -targets - 1:-1])


def forward_train(llm: Transformer, embeds: torch.Tensor, image_start: int, n_image: int, schedule: PyramidSchedule,
                  after: int) -> torch.Tensor:
    """The decoder without a cache over a batch of same-layout sequences (B, L, dim), with the drop
    as the authors train: the query is the last instruction token, `after` tokens before the end.
    Returns the final-normed hidden states of the surviving tokens."""
    h = embeds
    for i, layer in enumerate(llm.layers):
        rope = llm.rope(torch.arange(h.shape[1], device=h.device), h.dtype)
        if n_image and schedule.active and i in schedule.layers:
            alive = h.shape[1] - (embeds.shape[1] - n_image)
            n_keep = schedule.kept_after(n_image, schedule.layers.index(i))
            h = drop_batch(layer, rope, h, image_start, alive, n_keep, after)
            rope = llm.rope(torch.arange(h.shape[1], device=h.device), h.dtype)  # renumbered
        h = layer(h, rope, None)
    return llm.norm(h)


def drop_batch(layer, rope, h: torch.Tensor, start: int, n: int, n_keep: int, after: int) -> torch.Tensor:
    """pyramid.rank on each sequence of h (B, L, dim) cut just after its query, which has `after`
    tokens (the answer) behind it; h compacted. No gradient flows through the ranking."""
    length = h.shape[1]
    query_rope = tuple(t[..., :length - after, :] for t in rope)
    with torch.no_grad():
        rows = [pyramid.keep_rows(length, start, n, pyramid.rank(layer, query_rope, h[b:b + 1, :length - after],
                                                                 start, n, n_keep)) for b in range(h.shape[0])]
    return torch.stack([h[b, r] for b, r in enumerate(rows)])


def encode(processor, examples: list[Example], with_answer: bool) -> tuple[torch.Tensor, torch.Tensor]:
    texts = [PROMPT.format(question=ex.question) + (f" {ex.answer} </s>" if with_answer else "") for ex in examples]
    enc = processor(text=texts, images=[render(ex.items, IMAGE) for ex in examples], return_tensors="pt")
    return enc.input_ids, enc.pixel_values


def batches(examples: list[Example], size: int, parts: int, rng: random.Random):
    """Endless batches of `size` questions in `parts` parts, each part of one question length (same
    token layout, so no padding is needed). Lengths give the kind away, so a one-part batch is one
    kind of question; several parts mix kinds within a step."""
    lengths: dict[int, list[Example]] = {}
    for ex in examples:  # the word-level tokenizer's split: words and punctuation
        lengths.setdefault(len(re.findall(r"\w+|[^\w\s]+", ex.question)), []).append(ex)
    pools = list(lengths.values())
    weights = [len(p) for p in pools]
    while True:
        yield [rng.sample(pool, min(size // parts, len(pool))) for pool in rng.choices(pools, weights, k=parts)]


def fit(model: Model, processor, examples: list[Example], schedule: PyramidSchedule, steps: int, cfg: TrainConfig,
        log, name: str) -> tuple[list[float], list[float]]:
    """AdamW with warm-up and cosine decay over `steps` batches of `examples` (every answer the same
    number of tokens); the loss is on the answer and </s>. Returns losses and step times (seconds)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    data = batches(examples, cfg.batch_size, cfg.parts, random.Random(cfg.seed))
    targets = len(processor.tokenizer(examples[0].answer, add_special_tokens=False).input_ids) + 1  # and </s>
    losses, step_times = [], []
    model.train()
    for step in range(steps):
        encoded = [encode(processor, part, with_answer=True) for part in next(data)]
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for ids, pixels in encoded:
            logits = model.answer_logits(ids, pixels, schedule, targets)
            part = F.cross_entropy(logits.flatten(0, 1), ids[:, -targets:].flatten()) * len(ids) / cfg.batch_size
            part.backward()
            loss += part.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step_times.append(time.perf_counter() - start)
        losses.append(loss)
        if log and (step % 100 == 0 or step == steps - 1):
            log(f"{name} step {step:5d}  loss {loss:.4f}  {step_times[-1] * 1e3:.0f} ms/step")
    model.eval()
    return losses, step_times


def train(cfg: TrainConfig, out: str | Path | None = None, log=print, base: str | Path | None = None
          ) -> tuple[Model, dict]:
    """Train in three stages; returns the model and the answer stage's stats (losses; step times in
    seconds, warm-up steps left out). Saves an HF checkpoint to `out`. Stages 1 and 2 do not depend
    on the drop: with `base`, their result is kept there and reused by runs that differ only in
    drop ratio or answer steps (the report's two arms of a seed start from the same model)."""
    torch.manual_seed(cfg.seed)
    processor = make_processor()
    model = Model(make_config(processor, cfg))
    examples = dataset("train", cfg.train_examples, cfg.seed)
    shared = {k: v for k, v in asdict(cfg).items() if k not in ("drop_ratio", "steps")}
    kept = Path(base) / "stages-1-2.safetensors" if base is not None else None
    if kept is not None and kept.exists() and json.loads((kept.parent / "config.json").read_text()) == shared:
        model.load_state_dict(load_file(kept))
        model.vision.tower.requires_grad_(False)
        if log:
            log(f"stages 1-2 from {kept}")
    else:
        if kept is not None:  # a stale model must not outlive the config.json written beside it below
            kept.unlink(missing_ok=True)
        # Stage 1 stands in for CLIP's pretraining; then, as LLaVA trains, the tower stays frozen.
        pretrain_tower(model.vision, processor.image_processor, examples, IMAGE, cfg.pretrain_steps, 64, 1e-3,
                       cfg.seed, log)
        model.vision.tower.requires_grad_(False)
        # Stage 2, LLaVA's alignment on captions: every scene described cell by cell, 32 image-dependent
        # words per example where a question has one. Without it one-word answers left the answer
        # prior too slowly: each question's signal comes from a few of 88 image tokens.
        if cfg.describe_steps:
            fit(model, processor, descriptions("train", cfg.train_examples, cfg.seed),
                PyramidSchedule(cfg.layers, 0.0), cfg.describe_steps, cfg, log, "describe")
        if kept is not None:
            kept.parent.mkdir(parents=True, exist_ok=True)
            save_file(model.state_dict(), kept.with_suffix(".partial"))
            (kept.parent / "config.json").write_text(json.dumps(shared))
            kept.with_suffix(".partial").replace(kept)
    # Stage 3, instruction tuning on the questions: the stage PyramidDrop trains with.
    losses, step_times = fit(model, processor, examples, PyramidSchedule(cfg.layers, cfg.drop_ratio), cfg.steps, cfg,
                             log, "answer")
    if out is not None:
        save_hf_checkpoint(model.llm, model.vision, model.hf_config, processor, out)
    skip = min(10, len(step_times) // 2)  # the first steps warm up allocators and caches
    return model, {"losses": losses, "step_times": step_times[skip:]}
