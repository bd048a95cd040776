"""The runtime: load an engine directory and generate from (prompt, image) pairs.

    engine = Engine.load("engine", device="cpu")
    [result] = engine.generate(["<image>\\nWhat is shown? ASSISTANT:"], [image], max_new_tokens=32)

A batch may mix images of different sizes (different image-token counts) and text-only prompts:
each prompt is prefilled on its own (its own drop schedule and image span) into its row of one
static KV cache, then all rows decode together.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors.torch import load_file

from ..format.config import DTYPES, PyramidSchedule
from ..format.errors import EngineError, InputError
from ..format.manifest import LLM_WEIGHTS, VISION_WEIGHTS, read_manifest
from . import flops
from .decode import EagerDecoder, GraphDecoder
from .images import load_image
from .model import Transformer
from .pyramid import ImageSpan, StageStats
from .rope import Rope
from .sampling import Sampler, SamplingParams
from .vision import VisionEncoder, merge

IMAGE = "<image>"


@dataclass
class Request:
    """One prepared request (Engine.prepare): tokens, image tiles, sampling and drop schedule."""
    input_ids: torch.Tensor  # (L,) with the image span expanded to N image tokens
    params: SamplingParams
    schedule: PyramidSchedule
    image: object = None  # PIL image
    pixel_values: torch.Tensor | None = None  # (patches, 3, tile, tile)
    image_start: int = 0
    n_image: int = 0

    @property
    def prompt_tokens(self) -> int:
        """Prompt length, image tokens included."""
        return self.input_ids.numel()

    @property
    def image_tokens(self) -> int:
        return self.n_image


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop word) or "length"
    prompt_tokens: int
    image_tokens: int
    stages: list[StageStats]
    timings: dict
    flops: dict
    layout: dict = field(default_factory=dict)  # image-token layout, for keep maps

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "prompt_tokens": self.prompt_tokens, "image_tokens": self.image_tokens,
                "stages": [s.to_dict() for s in self.stages], "timings": self.timings, "flops": self.flops,
                "layout": self.layout}


@dataclass
class Delta:
    """One streamed event: new text of request `index`; `result` is set on its last event."""
    index: int
    text: str
    token_id: int | None
    result: Result | None = None


class _Row:
    """Decoding state of one request: its sampler, its tokens, the text streamed so far, stops."""

    def __init__(self, tokenizer, params: SamplingParams, eos: set[int], budget: int, device):
        self.tokenizer, self.params, self.eos, self.budget = tokenizer, params, eos, budget
        bad = [tokenizer.encode(w, add_special_tokens=False) for w in params.bad_words]
        self.sampler = Sampler(params, device, eos, bad)
        self.ids: list[int] = []
        self.sent = 0
        self.finish: str | None = None
        self.text = ""

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        return self.sampler(logits, self.ids)

    def add(self, token: int) -> str:
        self.ids.append(token)
        if token in self.eos:
            self.finish = "stop"
        text = self.tokenizer.decode([t for t in self.ids if t not in self.eos], skip_special_tokens=True)
        for s in self.params.stop:
            if s in text:
                text, self.finish = text[:text.index(s)], "stop"
        if self.finish is None and len(self.ids) >= self.budget:
            self.finish = "length"
        self.text = text
        # hold back an incomplete UTF-8 character or a possible start of a stop word
        end = len(text) if self.finish else len(text.rstrip("\ufffd")) - self._stop_prefix(text)
        delta, self.sent = text[self.sent:max(end, self.sent)], max(end, self.sent)
        return delta

    def _stop_prefix(self, text: str) -> int:
        return max((k for s in self.params.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def resolve_device(name: str | torch.device) -> torch.device:
    """'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N', checked against what is there."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported device '{name}': use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise InputError(f"no CUDA device '{device}' ({torch.cuda.device_count()} visible)")
    return device


def load_kernels(path: Path, manifest, device: torch.device):
    """The engine's CUDA kernels on a CUDA device; else None (the torch ops), said once."""
    if device.type != "cuda":
        return None
    library = manifest.plugins.get("library")
    if library is None:
        warnings.warn(f"pdrop: engine has no CUDA kernels ({manifest.plugins.get('reason', 'not built')}); "
                      "the drop runs on torch ops", stacklevel=3)
        return None
    from .kernels import Kernels

    return Kernels(path / library)


class Engine:
    def __init__(self, path: Path, manifest, llm: Transformer, vision: VisionEncoder, processor, device,
                 cuda_graphs: bool = True):
        self.path, self.manifest, self.llm, self.vision = path, manifest, llm, vision
        self.processor, self.tokenizer, self.device = processor, processor.tokenizer, device
        self.dtype = llm.output.weight.dtype
        graphs = cuda_graphs and device.type == "cuda"
        self.decoder = GraphDecoder(llm, manifest.limits.max_seq_len) if graphs else EagerDecoder(llm)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "auto", dtype: str | None = None,
             verify: bool = True, cuda_graphs: bool = True) -> "Engine":
        """Load an engine directory; `verify` checks every file's sha256 against the manifest;
        `cuda_graphs` replays decode steps from CUDA graphs on a CUDA device."""
        from transformers import AutoProcessor

        path = Path(path)
        manifest = read_manifest(path, verify=verify)
        device = resolve_device(device)
        if (dtype or manifest.dtype) not in DTYPES:
            raise InputError(f"unsupported dtype '{dtype}': choose {', '.join(DTYPES)}")
        torch_dtype = getattr(torch, dtype or manifest.dtype)
        cfg = manifest.llm
        with torch.device("meta"):
            llm = Transformer(cfg, manifest.limits.max_seq_len)
        llm.load_state_dict(load_file(path / LLM_WEIGHTS, device=str(device)), assign=True)
        llm.rope = Rope(cfg.head_dim, cfg.rope_theta, manifest.limits.max_seq_len)
        llm = llm.to(device=device, dtype=torch_dtype).eval()
        llm.kernels = load_kernels(path, manifest, device)
        vision = VisionEncoder(manifest.vision, cfg.dim)
        vision.load_weights(load_file(path / VISION_WEIGHTS))
        vision = vision.to(device=device, dtype=torch_dtype).eval()
        try:
            processor = AutoProcessor.from_pretrained(path)
        except Exception as e:
            raise EngineError(f"cannot load the processor of engine {path}: {e}") from None
        return cls(path, manifest, llm, vision, processor, device, cuda_graphs)

    # ---- requests -------------------------------------------------------------------------

    def chat_prompt(self, question: str, with_image: bool) -> str:
        """Wrap a plain question in the checkpoint's chat template."""
        if not self.processor.chat_template:
            raise InputError("this engine's processor has no chat template; pass a raw --prompt")
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)

    def schedule(self, drop_ratio: float | None) -> PyramidSchedule:
        base = self.manifest.pyramid
        if drop_ratio is None:
            return base
        return PyramidSchedule.create(self.manifest.llm.n_layers, drop_ratio, base.layers)

    def prepare(self, prompt: str, image, params: SamplingParams, drop_ratio: float | None = None,
                schedule: PyramidSchedule | None = None) -> Request:
        """Tokenize and check one request; `schedule` (e.g. a baseline) replaces the engine's."""
        params.validate()
        schedule = schedule or self.schedule(drop_ratio)
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
        if image is None:
            if IMAGE in prompt:
                raise InputError(f"the prompt has {IMAGE} but no image was given")
            ids = self.tokenizer(prompt, return_tensors="pt").input_ids[0]
            req = Request(ids, params, schedule)
        else:
            image = load_image(image)
            if IMAGE not in prompt:
                prompt = f"{IMAGE}\n{prompt}"
            if prompt.count(IMAGE) > 1:
                raise InputError(f"one image per prompt: found {prompt.count(IMAGE)} {IMAGE} markers")
            enc = self.processor(text=prompt, images=image, return_tensors="pt")
            ids = enc.input_ids[0]
            where = (ids == self.manifest.image_token_id).nonzero()[:, 0]
            req = Request(ids, params, schedule, image, enc.pixel_values[0], int(where[0]), where.numel())
        limit = self.manifest.limits.max_input_len
        if req.input_ids.numel() > limit:
            raise InputError(f"prompt is {req.input_ids.numel()} tokens ({req.n_image} of them image tokens); "
                             f"this engine's max_input_len is {limit}")
        return req

    def _embed(self, req: Request) -> tuple[torch.Tensor, dict]:
        ids = req.input_ids.to(self.device)
        embeds = self.llm.tok_embeddings(ids)[None]  # (1, L, dim)
        if req.image is None:
            return embeds, {}
        size = (req.image.height, req.image.width)
        feats, layout = self.vision(req.pixel_values.to(self.device, self.dtype), size)
        if feats.shape[0] != req.n_image:
            raise InputError(f"the processor made {req.n_image} image tokens but the vision tower "
                             f"{feats.shape[0]}: processor and model configs disagree")
        return merge(embeds, req.image_start, feats[None]), layout

    # ---- generation -----------------------------------------------------------------------

    def stream(self, prompts: Sequence[str], images: Sequence | None = None, *, max_new_tokens: int = 64,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
               stop: Sequence[str] | None = None, drop_ratio: float | Sequence[float | None] | None = None,
               params: Sequence[SamplingParams] | None = None) -> Iterator[Delta]:
        """Generate for a batch, yielding text deltas as tokens are decoded."""
        n = len(prompts)
        images = list(images) if images is not None else [None] * n
        if len(images) != n:
            raise InputError(f"{n} prompts but {len(images)} images")
        if params is None:
            params = [SamplingParams(max_new_tokens, temperature, top_k, top_p,
                                     None if seed is None else seed + i, list(stop or [])) for i in range(n)]
        ratios = list(drop_ratio) if isinstance(drop_ratio, (list, tuple)) else [drop_ratio] * n
        if n > self.manifest.limits.max_batch_size:
            raise InputError(f"batch of {n} exceeds this engine's max_batch_size {self.manifest.limits.max_batch_size}")
        t0 = time.perf_counter()
        reqs = [self.prepare(p, im, sp, r) for p, im, sp, r in zip(prompts, images, params, ratios)]
        with torch.inference_mode():
            yield from self.stream_prepared(reqs, t0)

    def generate(self, prompts: Sequence[str], images: Sequence | None = None, **kwargs) -> list[Result]:
        results: list[Result | None] = [None] * len(prompts)
        for d in self.stream(prompts, images, **kwargs):
            if d.result is not None:
                results[d.index] = d.result
        return results

    def stream_prepared(self, reqs: list[Request], t0: float | None = None) -> Iterator[Delta]:
        """Prefill every prepared request, then decode them together; t0 is when preprocessing began."""
        t0 = time.perf_counter() if t0 is None else t0
        max_seq = self.manifest.limits.max_seq_len
        budgets = [min(r.params.max_new_tokens, max_seq - r.input_ids.numel()) for r in reqs]
        # finished rows keep stepping with the batch, so every row may grow by the largest budget
        self.decoder.prepare(len(reqs), max(r.input_ids.numel() for r in reqs) + max(budgets))
        rows = [_Row(self.tokenizer, r.params, {r.params.end_id} if r.params.end_id is not None
                     else set(self.manifest.eos_token_ids), b, self.device) for r, b in zip(reqs, budgets)]

        vision_s, stages, layouts, first = 0.0, [], [], []
        t_pre = time.perf_counter() - t0
        for i, req in enumerate(reqs):
            tv = time.perf_counter()
            embeds, layout = self._embed(req)
            self._sync()
            vision_s += time.perf_counter() - tv
            span = ImageSpan.full(req.image_start, req.n_image, self.device) if req.n_image else None
            h, st = self.llm.prefill(embeds, i, span, req.schedule)
            first.append(rows[i].sample(self.llm.output(h[0, -1])))
            stages.append(st)
            layouts.append(layout)
        tokens = torch.stack(first)
        self._sync()
        ttft = time.perf_counter() - t0

        while True:
            ids = tokens.tolist()
            for i, row in enumerate(rows):
                if row.finish is None:
                    delta = row.add(ids[i])
                    if row.finish is None:
                        yield Delta(i, delta, ids[i])
                    else:
                        timing = (t0, t_pre, vision_s, ttft)
                        yield Delta(i, delta, ids[i], self._result(reqs[i], row, stages[i], layouts[i], timing))
            if all(row.finish for row in rows):
                return
            logits = self.decoder.step(tokens)
            tokens = torch.stack([row.sample(logits[i]) for i, row in enumerate(rows)])

    def _result(self, req: Request, row: _Row, stages, layout, timing: tuple) -> Result:
        t0, t_pre, vision_s, ttft = timing
        total = time.perf_counter() - t0
        decode_s = total - ttft
        n_text = req.input_ids.numel() - req.n_image
        return Result(
            text=row.text, token_ids=row.ids, finish_reason=row.finish, prompt_tokens=req.input_ids.numel(),
            image_tokens=req.n_image, stages=stages, layout=layout,
            timings={"preprocess_s": t_pre, "vision_s": vision_s, "prefill_s": ttft - t_pre - vision_s,
                     "ttft_s": ttft, "decode_s": decode_s,
                     "total_s": total,
                     "decode_tokens_per_s": (len(row.ids) - 1) / decode_s if len(row.ids) > 1 and decode_s else 0.0},
            flops=flops.report(self.manifest.llm, req.schedule, req.n_image, n_text))

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
