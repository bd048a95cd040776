"""Triton request and response tensors <-> engine calls, in plain numpy (no Triton import).

The inputs are tensorrtllm_backend's multimodal ensemble's, all of them (its clients send some
always, e.g. beam_width), plus min_length, exclude_input_in_output and num_return_sequences of its
text ensemble, and our `drop_ratio`. Each tensor has the batch dimension first (max_batch_size >
0), so a scalar arrives as [[x]]. What pdrop does not implement is refused by name when a request
asks for it, except the inputs that cannot change the answer. `text_output` goes back with shape
[1] (one string per beam), as tensorrtllm_backend's postprocessing returns it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..format.errors import InputError
from ..runtime.guided import Guide
from ..runtime.sampling import SamplingParams

Getter = Callable[[str], "np.ndarray | None"]

# Accepted without effect: pad_id (outputs are never padded), length_penalty (it scores beams, and
# there is one). prompt_table_extra_id names the image for the prefix cache, as in TensorRT-LLM. Refused when
# sent with anything but their neutral value:
UNSUPPORTED = {
    "image_input": "preprocessed image_input is not supported: send the image as image_bytes_input or image_url_input",
    "video_bytes_input": "video input is not supported",
    "decoder_text_input": "decoder_text_input is for encoder-decoder models; this one is decoder-only",
    "embedding_bias_words": "embedding_bias_words is not supported",
    "embedding_bias_weights": "embedding_bias_weights is not supported",
    "return_context_logits": "return_context_logits is not supported",
    "return_generation_logits": "return_generation_logits is not supported",
}


@dataclass
class Job:
    prompt: str
    image: object  # a data:image URL, an (H, W, 3) uint8 array or None: Engine.prepare decodes it
    params: SamplingParams
    drop_ratio: float | None
    stream: bool
    exclude_input: bool
    image_id: int | None = None  # prompt_table_extra_id: the client's name for the image


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
        return text
    if pixels is not None:
        if pixels.dtype != np.uint8:
            raise InputError(f"image_bytes_input must be UINT8, got {pixels.dtype}")
        squeezed = pixels.reshape(pixels.shape[-3:]) if math.prod(pixels.shape[:-3]) == 1 else pixels
        return np.ascontiguousarray(squeezed)
    return None


def _refuse_unsupported(get: Getter) -> None:
    for name, why in UNSUPPORTED.items():
        value = get(name)
        if value is not None and _asks(value):
            raise InputError(why)
    for name in ("beam_width", "num_return_sequences"):
        n = _scalar(get, name, int, 1)
        if n != 1:
            raise InputError(f"{name} {n} is not supported: pdrop generates one sequence per request (send 1)")


def _asks(value: np.ndarray) -> bool:
    """Whether an input asks for something: a true flag, a non-empty string, any number."""
    if value.dtype == np.bool_:
        return bool(value.any())
    if value.dtype == np.object_:
        return any(v not in (b"", "") for v in value.reshape(-1))
    return value.size > 0


def _guide(get: Getter) -> Guide | None:
    """TensorRT-LLM's guided decoding inputs: the type ("json", "json_schema", "regex", "lark",
    "ebnf_grammar") and the guide itself (unused for "json")."""
    kinds, specs = _strings(get, "guided_decoding_guide_type"), _strings(get, "guided_decoding_guide")
    if len(kinds) > 1 or len(specs) > 1:
        raise InputError("send one guided_decoding_guide_type and one guided_decoding_guide")
    if not kinds:
        if specs:
            raise InputError("guided_decoding_guide needs guided_decoding_guide_type")
        return None
    return Guide(kinds[0], specs[0] if specs else "")


def parse_request(get: Getter) -> Job:
    """Read one request's tensors (`get(name)` gives the array or None) into an engine job."""
    _refuse_unsupported(get)
    prompts = _strings(get, "text_input")
    if len(prompts) != 1 or not prompts[0].strip():
        raise InputError("text_input must be one non-empty string")
    max_tokens = _scalar(get, "max_tokens", int)
    if max_tokens is None or max_tokens < 1:
        raise InputError(f"max_tokens must be a positive integer, got {max_tokens}")
    minimums = {name: _scalar(get, name, int, 0) for name in ("min_tokens", "min_length")}  # two names, one meaning
    for name, n in minimums.items():
        if n < 0:
            raise InputError(f"{name} must be >= 0, got {n}")
    min_tokens = max(minimums.values())
    params = SamplingParams(
        max_new_tokens=max_tokens, temperature=_scalar(get, "temperature", float, 0.0),
        # top_p 0 turns top-p off, as in TensorRT-LLM (tools/multimodal/client.py sends it by default)
        top_k=_scalar(get, "top_k", int, 0), top_p=_scalar(get, "top_p", float, 1.0) or 1.0,
        seed=_scalar(get, "seed", int), stop=[s for s in _strings(get, "stop_words") if s],
        end_id=_scalar(get, "end_id", int), min_tokens=min_tokens,
        bad_words=[s for s in _strings(get, "bad_words") if s],
        repetition_penalty=_scalar(get, "repetition_penalty", float, 1.0),
        presence_penalty=_scalar(get, "presence_penalty", float, 0.0),
        frequency_penalty=_scalar(get, "frequency_penalty", float, 0.0),
        # tensorrtllm_backend's flag for each token's logprob; ours for the k most likely besides
        logprobs=_scalar(get, "top_log_probs", int, 0) if _scalar(get, "return_log_probs", bool, False) else None,
        guide=_guide(get))
    params.validate()
    drop = _scalar(get, "drop_ratio", float)
    return Job(prompts[0], _image(get), params, drop, _scalar(get, "stream", bool, False),
               _scalar(get, "exclude_input_in_output", bool, True), _scalar(get, "prompt_table_extra_id", int))


def response_tensors(text: str, ids: list[int], output_tokens: int, prompt_tokens: int, image_tokens: int,
                     stages: list, finish_reason: str, stats: dict[str, int], times_ns: tuple[int, int, int],
                     logprobs: list | None = None, cum_log_prob: float = 0.0) -> dict[str, np.ndarray]:
    """The outputs of one response, each with a leading batch dimension of 1. `text` and `ids` are
    what this response adds (streaming) or the whole answer; `output_tokens` counts all so far;
    `stats` is the scheduler's (Engine.stats): `batch_size` is the sequences running with this one.
    With `logprobs` (runtime.sampling.TokenLogprob, one per id, when the request asked):
    tensorrtllm_backend's `output_log_probs` and `cum_log_probs` (all tokens so far), and ours,
    `output_top_log_probs` / `output_top_ids` (each token's k most likely, one after another)."""
    arrival, first, last = times_ns
    extra = {} if logprobs is None else {
        "output_log_probs": np.array([[t.logprob for t in logprobs]], dtype=np.float32),
        "cum_log_probs": np.array([[cum_log_prob]], dtype=np.float32),
        "output_top_log_probs": np.array([[lp for t in logprobs for _, lp in t.top]], dtype=np.float32),
        "output_top_ids": np.array([[i for t in logprobs for i, _ in t.top]], dtype=np.int32)}
    return extra | {
        "text_output": np.array([text.encode("utf-8")], dtype=np.object_),
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
