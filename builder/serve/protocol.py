"""Triton request and response tensors <-> engine calls, in plain numpy (no Triton import).

Input names and types follow tensorrtllm_backend's multimodal ensemble (text_input, max_tokens,
image_url_input, image_bytes_input, stream, temperature, top_p, top_k, end_id, pad_id, min_tokens,
seed, stop_words, bad_words, exclude_input_in_output, min_length), plus `drop_ratio`. Each
tensor has the batch dimension first (max_batch_size > 0), so a scalar arrives as [[x]].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..format.errors import InputError
from ..runtime.images import load_image
from ..runtime.sampling import SamplingParams

Getter = Callable[[str], "np.ndarray | None"]


@dataclass
class Job:
    prompt: str
    image: object  # PIL image or None
    params: SamplingParams
    drop_ratio: float | None
    stream: bool
    exclude_input: bool


def _scalar(get: Getter, name: str, kind: type, default=None):
    value = get(name)
    if value is None:
        return default
    if value.size != 1:
        raise InputError(f"{name} must hold one value, got shape {list(value.shape)}")
    return kind(value.reshape(-1)[0])


def _strings(get: Getter, name: str) -> list[str]:
    value = get(name)
    if value is None:
        return []
    try:
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value.reshape(-1)]
    except UnicodeDecodeError:
        raise InputError(f"{name} is not valid UTF-8") from None


def _image(get: Getter):
    url, pixels = get("image_url_input"), get("image_bytes_input")
    if url is not None and pixels is not None:
        raise InputError("send one image input: image_url_input or image_bytes_input, not both")
    if url is not None:
        urls = _strings(get, "image_url_input")
        if len(urls) != 1:
            raise InputError(f"one image per request, got {len(urls)} image URLs")
        text = urls[0]
        if not text.startswith("data:image/"):
            raise InputError("only data:image/...;base64 URLs are accepted: the server never fetches remote images")
        return load_image(text)
    if pixels is not None:
        if pixels.dtype != np.uint8:
            raise InputError(f"image_bytes_input must be UINT8, got {pixels.dtype}")
        squeezed = pixels.reshape(pixels.shape[-3:]) if math.prod(pixels.shape[:-3]) == 1 else pixels
        return load_image(np.ascontiguousarray(squeezed))
    return None


def parse_request(get: Getter) -> Job:
    """Read one request's tensors (`get(name)` gives the array or None) into an engine job."""
    prompts = _strings(get, "text_input")
    if len(prompts) != 1 or not prompts[0].strip():
        raise InputError("text_input must be one non-empty string")
    max_tokens = _scalar(get, "max_tokens", int)
    if max_tokens is None or max_tokens < 1:
        raise InputError(f"max_tokens must be a positive integer, got {max_tokens}")
    min_tokens = max(_scalar(get, "min_tokens", int, 0), _scalar(get, "min_length", int, 0))
    params = SamplingParams(
        max_new_tokens=max_tokens, temperature=_scalar(get, "temperature", float, 0.0),
        top_k=_scalar(get, "top_k", int, 0), top_p=_scalar(get, "top_p", float, 1.0),
        seed=_scalar(get, "seed", int), stop=[s for s in _strings(get, "stop_words") if s],
        end_id=_scalar(get, "end_id", int), min_tokens=min_tokens,
        bad_words=[s for s in _strings(get, "bad_words") if s])
    params.validate()
    drop = _scalar(get, "drop_ratio", float)
    return Job(prompts[0], _image(get), params, drop, _scalar(get, "stream", bool, False),
               _scalar(get, "exclude_input_in_output", bool, True))


def response_tensors(text: str, ids: list[int], output_tokens: int, prompt_tokens: int, image_tokens: int,
                     stages: list, finish_reason: str, stats: dict[str, int], times_ns: tuple[int, int, int]
                     ) -> dict[str, np.ndarray]:
    """The outputs of one response, each with a leading batch dimension of 1. `text` and `ids` are
    what this response adds (streaming) or the whole answer; `output_tokens` counts all so far;
    `stats` is the scheduler's (Engine.stats): `batch_size` is the sequences running with this one."""
    arrival, first, last = times_ns
    return {
        "text_output": np.array([[text.encode("utf-8")]], dtype=np.object_),
        "output_ids": np.array(ids, dtype=np.int32).reshape(1, -1),
        "output_tokens": np.array([[output_tokens]], dtype=np.int32),
        "prompt_tokens": np.array([[prompt_tokens]], dtype=np.int32),
        "image_tokens": np.array([[image_tokens]], dtype=np.int32),
        "stage_layers": np.array([[s.layer for s in stages]], dtype=np.int32).reshape(1, -1),
        "stage_tokens_in": np.array([[s.tokens_in for s in stages]], dtype=np.int32).reshape(1, -1),
        "stage_tokens_kept": np.array([[s.tokens_kept for s in stages]], dtype=np.int32).reshape(1, -1),
        "finish_reason": np.array([[finish_reason.encode()]], dtype=np.object_),
        "batch_size": np.array([[stats["running"]]], dtype=np.int32),
        "queue_length": np.array([[stats["queued"]]], dtype=np.int32),
        "kv_blocks_used": np.array([[stats["kv_blocks_used"]]], dtype=np.int32),
        "kv_blocks_free": np.array([[stats["kv_blocks_free"]]], dtype=np.int32),
        "arrival_time_ns": np.array([[arrival]], dtype=np.int64),
        "first_token_time_ns": np.array([[first]], dtype=np.int64),
        "last_token_time_ns": np.array([[last]], dtype=np.int64),
    }


def check_budget(prompt_tokens: int, max_tokens: int, max_seq_len: int) -> None:
    """A server refuses what it cannot finish, rather than cutting the answer short."""
    if prompt_tokens + max_tokens > max_seq_len:
        raise InputError(f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds this engine's "
                         f"max_seq_len ({max_seq_len})")
