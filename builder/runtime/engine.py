"""The runtime: load an engine directory and generate from (prompt, image) pairs.

    engine = Engine.load("engine", device="cpu")
    [result] = engine.generate(["<image>\\nWhat is shown? ASSISTANT:"], [image], max_new_tokens=32)

A batch may mix images of different sizes (different image-token counts) and text-only prompts:
each prompt is prefilled on its own (its own drop schedule and image span), a pyramid stage at a
time, into its blocks of the paged KV cache; decoding runs every admitted sequence together. All of
it goes through the step scheduler (scheduler.py), the same path a server uses.
"""
from __future__ import annotations

import contextlib
import functools
import math
import queue
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors.torch import load_file

from ..format.config import PyramidSchedule
from ..format.errors import EngineError, InputError, first_line
from ..format.manifest import LLM_WEIGHTS, VISION_WEIGHTS, read_manifest
from ..network.images import load_image
from ..network.kernel_linear import use_kernel_linears
from ..network.model import Transformer
from ..network.precision import resolve_dtype
from ..network.rope import Rope
from ..network.vision import VisionEncoder, merge
from .decode import Decoder, GraphDecoder
from .guided import Grammars
from .memory_plan import DEFAULT_FRACTION, plan_memory
from .paged_kv import BlockPool
from .prefix_cache import PrefixCache, image_key
from .sampling import SamplingParams
from .scheduler import Delta, Result, Scheduler

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
    image_key: str | None = None  # names the image for the prefix cache (prefix_cache.image_key)
    grammar: str | None = None  # params.guide compiled (guided.Grammars)

    @property
    def prompt_tokens(self) -> int:
        """Prompt length, image tokens included."""
        return self.input_ids.numel()

    @property
    def image_tokens(self) -> int:
        return self.n_image


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
                      "the drop and decode attention run on torch ops, decode without CUDA graphs", stacklevel=3)
        return None
    from ..network.kernels import Kernels

    return Kernels(path / library)


def load_cpu_kernels(path: Path, manifest, dtype: torch.dtype):
    """The engine's CPU decode kernels for this CPU's instruction set and `dtype`; else None (torch
    ops), said once."""
    from ..network.kernels import CpuKernels

    if dtype not in CpuKernels.dtypes:
        warnings.warn(f"pdrop: the CPU kernels take float32 and bfloat16; {dtype} decode runs on torch ops",
                      stacklevel=3)
        return None
    record = manifest.plugins.get("cpu", {"libraries": None, "reason": "engine built before CPU kernels"})
    libraries = record["libraries"]
    if not libraries:
        warnings.warn(f"pdrop: engine has no CPU kernels ({record['reason']}); decode attention runs on torch ops",
                      stacklevel=3)
        return None
    capability = torch.backends.cpu.get_cpu_capability().lower()
    try:
        return CpuKernels(path / libraries.get(capability, libraries["default"]))
    except EngineError as e:  # built for another architecture, say: slower, not wrong
        warnings.warn(f"pdrop: {e}; decode attention runs on torch ops", stacklevel=3)
        return None


class Engine:
    def __init__(self, path: Path, manifest, llm: Transformer, vision: VisionEncoder, processor, device,
                 cuda_graphs: bool = True, kv_cache_tokens: int | None = None, block_size: int = 16,
                 scheduler: str = "inflight", max_queued_requests: int = 64,
                 kv_cache_memory_fraction: float | None = None, compiled: bool = False,
                 prefix_cache_tokens: int | None = None):
        self.path, self.manifest, self.llm, self.vision = path, manifest, llm, vision
        self.processor, self.tokenizer, self.device = processor, processor.tokenizer, device
        # no token stands for more prompt bytes than its vocabulary string takes (spaces and raw
        # bytes are spelled longer there), so a prompt longer than this many bytes a token is too long
        self.max_token_bytes = max(len(t.encode()) for t in self.tokenizer.get_vocab())
        self.dtype = llm.tok_embeddings.weight.dtype  # network.precision chose it
        cfg, limits = manifest.llm, manifest.limits
        if block_size < 1 or (kv_cache_tokens is not None and kv_cache_tokens < 1):
            raise InputError(f"kv_cache_tokens and block_size must be positive, got {kv_cache_tokens} and {block_size}")
        graphs = cuda_graphs and device.type == "cuda" and llm.decode_kernels is not None
        width = math.ceil(limits.max_seq_len / block_size)  # the CUDA graphs' block tables, in every layer
        with self.on_device():
            self.plan = None
            tokens = kv_cache_tokens or self._pool_tokens(kv_cache_memory_fraction, block_size, width)
            self.pool = BlockPool(cfg.n_layers * math.ceil(tokens / block_size), block_size, cfg.n_kv_heads,
                                  cfg.head_dim, self.dtype, device)
            llm.attach(self.pool)
            self.decoder = (GraphDecoder(llm, width, limits.max_batch_size, compiled) if graphs
                            else Decoder(llm, compiled))
            with torch.inference_mode():  # as the steps run: the graphs' inputs are inference tensors
                self.decoder.warm_up()
        self.prefix_cache = self._prefix_cache(prefix_cache_tokens, tokens, block_size)
        self.scheduler = Scheduler(self, self.pool, limits.max_batch_size, max_queued_requests, scheduler,
                                   self.prefix_cache)

    def _prefix_cache(self, tokens: int | None, pool_tokens: int, block_size: int) -> PrefixCache | None:
        """At most `tokens` token slots in every layer (default a quarter of the pool's) for shared
        prefixes; 0: none."""
        if tokens is not None and tokens < 0:
            raise InputError(f"prefix_cache_tokens must be >= 0 (0 turns the cache off), got {tokens}")
        tokens = pool_tokens // 4 if tokens is None else tokens
        if not tokens:
            return None
        n_layers = self.manifest.llm.n_layers
        return PrefixCache(self.pool, n_layers, math.ceil(tokens / block_size) * n_layers)

    def _pool_tokens(self, memory_fraction: float | None, block_size: int, table_width: int) -> int:
        """Token slots per layer. On CUDA, planned from the measured peak of the largest work
        (memory_plan): a fraction (default 0.9) of the memory the weights and that peak leave.
        On a CPU, max_batch_size x max_seq_len: every batch slot can hold a whole sequence in every
        layer, as with no drop, and pages never touched cost nothing."""
        limits = self.manifest.limits
        if memory_fraction is not None and (self.device.type != "cuda" or not 0 < memory_fraction < 1):
            raise InputError(f"kv_cache_memory_fraction must be in (0, 1) and needs a CUDA device, "
                             f"got {memory_fraction} on {self.device}")
        if self.device.type != "cuda":
            return limits.max_batch_size * limits.max_seq_len
        self.plan = plan_memory(self.llm, self.vision, self.manifest, block_size, table_width, self.device,
                                memory_fraction or DEFAULT_FRACTION)
        print(f"pdrop: memory plan on {self.device}: {self.plan.describe()}", file=sys.stderr, flush=True)
        return self.plan.tokens

    @functools.cached_property
    def grammars(self) -> Grammars:
        """Structured output's compiler for this engine's tokenizer, made at the first guided request."""
        return Grammars(self.tokenizer, self.manifest.llm.vocab_size, self.manifest.eos_token_ids)

    @property
    def precision(self) -> str:
        """The dtype the engine runs in, by name: 'float32', 'bfloat16', 'float16'."""
        return str(self.dtype).removeprefix("torch.")

    def on_device(self):
        """The engine's CUDA device as the calling thread's current one (streams, graphs and kernel
        launches go to the current device); nothing on a CPU."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "auto", dtype: str | None = None,
             verify: bool = True, cuda_graphs: bool = True, kv_cache_tokens: int | None = None,
             scheduler: str = "inflight", max_queued_requests: int = 64,
             kv_cache_memory_fraction: float | None = None, compiled: bool = False,
             prefix_cache_tokens: int | None = None) -> "Engine":
        """Load an engine directory; `dtype` (float32, float16, bfloat16) is the precision it runs
        in, by default what the build chose (network.precision); `verify`
        checks every file's sha256 against the manifest;
        `cuda_graphs` replays decode steps from CUDA graphs on a CUDA device with the engine's
        kernels, one per batch bucket, all captured here; `compiled` runs them through torch.compile
        (compiled here too: tens of seconds); the KV pool holds `kv_cache_tokens` token slots per
        layer, by default on CUDA `kv_cache_memory_fraction` (default 0.9) of the memory left by the
        weights and the measured peak of the largest work (memory_plan), on a CPU max_batch_size x
        max_seq_len; `scheduler` is "inflight" (requests join and leave between steps) or "static"
        (the baseline); the prefix cache (prefix_cache: several questions about one image share its
        vision features and first-stage KV) holds up to `prefix_cache_tokens` token slots in every
        layer (default a quarter of the pool's; 0 turns it off)."""
        from transformers import AutoProcessor

        path = Path(path)
        manifest = read_manifest(path, verify=verify)
        device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, manifest.precision, manifest.dtype, device)
        cfg = manifest.llm
        with torch.device("meta"):
            llm = Transformer(cfg, manifest.limits.max_seq_len)
        llm.load_state_dict(load_file(path / LLM_WEIGHTS, device=str(device)), assign=True)
        llm.rope = Rope(cfg.head_dim, cfg.rope_theta, manifest.limits.max_seq_len)
        llm = llm.to(device=device, dtype=torch_dtype).eval()
        llm.kernels = load_kernels(path, manifest, device)
        llm.decode_kernels = llm.kernels if device.type == "cuda" else load_cpu_kernels(path, manifest, torch_dtype)
        vision = VisionEncoder(manifest.vision, cfg.dim)
        vision.load_weights(load_file(path / VISION_WEIGHTS))
        vision = vision.to(device=device, dtype=torch_dtype).eval()
        if device.type == "cpu" and llm.decode_kernels is not None:
            use_kernel_linears(llm, llm.decode_kernels)
        try:
            processor = AutoProcessor.from_pretrained(path)
        except Exception as e:
            raise EngineError(f"cannot load the processor of engine {path}: {e}") from None
        return cls(path, manifest, llm, vision, processor, device, cuda_graphs, kv_cache_tokens,
                   scheduler=scheduler, max_queued_requests=max_queued_requests,
                   kv_cache_memory_fraction=kv_cache_memory_fraction, compiled=compiled,
                   prefix_cache_tokens=prefix_cache_tokens)

    # ---- serving: requests come and go while the scheduler steps in its own thread ---------

    def start_serving(self) -> None:
        """Step the scheduler in a thread of its own: `submit` from any thread, events come from it."""
        self.scheduler.start()

    def stop_serving(self) -> None:
        """Stop the thread; what is still queued or running ends as cancelled (each gets its last event)."""
        self.scheduler.stop()

    def submit(self, req: Request, on_event, index: int = 0, t0: float | None = None, is_cancelled=None):
        """Queue a prepared request; `on_event` gets its Deltas (the last carries the Result) or a
        PdropError; `is_cancelled()` is polled every step. InputError at once when the queue is full
        or the request can never fit the KV pool. Returns a handle with cancel()."""
        return self.scheduler.submit(req, on_event, index, t0, is_cancelled)

    def stats(self) -> dict[str, int]:
        """queued, running, kv_blocks_used / _free; of the last step: scheduled, context; the prefix
        cache's blocks, hits and misses."""
        return self.scheduler.stats()

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
                schedule: PyramidSchedule | None = None, image_id: int | None = None) -> Request:
        """Tokenize and check one request; `schedule` (e.g. a baseline) replaces the engine's;
        `image_id` names the image for the prefix cache (TensorRT-LLM's prompt_table_extra_id),
        else a hash of its pixels does."""
        params.validate()
        vocab = self.manifest.llm.vocab_size
        if params.end_id is not None and not -1 <= params.end_id < vocab:  # a negative index would wrap
            raise InputError(f"end_id must be a token id in [0, {vocab}) or -1 (none), got {params.end_id}")
        schedule = schedule or self.schedule(drop_ratio)
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
        limit = self.manifest.limits.max_input_len
        if len(prompt.encode()) > limit * self.max_token_bytes:  # refused before tokenizing it
            raise InputError(f"prompt is {len(prompt.encode())} bytes, more than {limit} tokens can hold "
                             f"(at most {self.max_token_bytes} bytes each); this engine's max_input_len is {limit}")
        if image is None:
            if IMAGE in prompt:
                raise InputError(f"the prompt has {IMAGE} but no image was given")
            ids = self.tokenizer(prompt, return_tensors="pt").input_ids[0]
            req = Request(ids, params, schedule)
        else:
            image = load_image(image, self.manifest.limits.max_image_pixels)
            if IMAGE not in prompt:
                prompt = f"{IMAGE}\n{prompt}"
            if prompt.count(IMAGE) > 1:
                raise InputError(f"one image per prompt: found {prompt.count(IMAGE)} {IMAGE} markers")
            try:
                enc = self.processor(text=prompt, images=image, return_tensors="pt")
            except Exception as e:  # the image processor refusing this image refuses this request only
                raise InputError(f"cannot preprocess the request: {type(e).__name__}: {first_line(e)}") from None
            ids = enc.input_ids[0]
            where = (ids == self.manifest.image_token_id).nonzero()[:, 0]
            req = Request(ids, params, schedule, image, enc.pixel_values[0], int(where[0]), where.numel())
            if self.prefix_cache is not None:  # a client's id names an entry; the pixels must match it too
                req.image_key = ("" if image_id is None else f"id:{image_id}:") + image_key(
                    req.pixel_values, (image.height, image.width))
        if params.guide is not None:  # compiled here: a grammar that cannot compile is refused before any work
            req.grammar = self.grammars.compile(params.guide)
        if req.input_ids.numel() > limit:
            raise InputError(f"prompt is {req.input_ids.numel()} tokens ({req.n_image} of them image tokens); "
                             f"this engine's max_input_len is {limit}")
        return req

    def image_features(self, req: Request) -> tuple[torch.Tensor, dict]:
        """The request's image through the vision tower: (n_image, dim) features and their layout."""
        size = (req.image.height, req.image.width)
        feats, layout = self.vision(req.pixel_values.to(self.device, self.dtype), size)
        if feats.shape[0] != req.n_image:
            raise InputError(f"the processor made {req.n_image} image tokens but the vision tower "
                             f"{feats.shape[0]}: processor and model configs disagree")
        return feats, layout

    def embed(self, req: Request, features: tuple | None = None) -> tuple[torch.Tensor, dict]:
        """The prompt's embeddings (1, L, dim), image features spliced in, and the image-token layout;
        `features` (image_features' answer, from the prefix cache) spares the vision tower."""
        ids = req.input_ids.to(self.device)
        embeds = self.llm.tok_embeddings(ids)[None]  # (1, L, dim)
        if req.image is None:
            return embeds, {}
        feats, layout = features or self.image_features(req)
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
        yield from self.stream_prepared(reqs, t0)  # it steps in inference mode, not the caller between deltas

    def generate(self, prompts: Sequence[str], images: Sequence | None = None, **kwargs) -> list[Result]:
        results: list[Result | None] = [None] * len(prompts)
        for d in self.stream(prompts, images, **kwargs):
            if d.result is not None:
                results[d.index] = d.result
        return results

    def stream_prepared(self, reqs: list[Request], t0: float | None = None) -> Iterator[Delta]:
        """Generate prepared requests through the scheduler, yielding their deltas as they come; t0
        is when preprocessing began. Closing the iterator early cancels what is left."""
        events: queue.SimpleQueue = queue.SimpleQueue()
        handles = [self.submit(r, events.put, i, t0) for i, r in enumerate(reqs)]
        try:
            left = len(handles)
            while left:
                while self.scheduler.thread is None and events.empty():
                    with torch.inference_mode(), self.on_device():
                        self.scheduler.step()
                event = events.get()
                if isinstance(event, Exception):
                    raise event
                left -= event.result is not None
                yield event
        finally:
            for h in handles:
                h.cancel()
            if self.scheduler.thread is None:
                self.scheduler.retire_cancelled()  # their blocks go back now, not at the next request

    def device_error(self) -> str | None:
        """Why the device can run nothing more, or None: after a failure, a sticky CUDA error (an
        illegal address, a device-side assert) is raised again by any later call, a sync included."""
        if self.device.type != "cuda":
            return None
        try:
            torch.cuda.synchronize(self.device)
        except Exception as e:
            return (f"the CUDA device {self.device} is unusable after an error ({first_line(e) or type(e).__name__}); "
                    "this model refuses new requests: restart the server")
        return None

    def sync(self) -> None:
        """Wait for the device, so that host timings mean something."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
