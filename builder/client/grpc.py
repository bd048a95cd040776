"""A small tritonclient gRPC client for a served engine, as tensorrtllm_backend's clients talk.

Every input is a [1, 1] array (the model's batch dimension is implicit); a streamed request gets
one response per token and a final flag.
"""
from __future__ import annotations

import base64
import io
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# optional inputs and their numpy types (as the model's config.pbtxt declares them)
OPTIONAL = {"temperature": np.float32, "top_p": np.float32, "top_k": np.int32, "end_id": np.int32,
            "pad_id": np.int32, "min_tokens": np.int32, "min_length": np.int32, "seed": np.uint64,
            "exclude_input_in_output": np.bool_, "drop_ratio": np.float32, "repetition_penalty": np.float32,
            "presence_penalty": np.float32, "frequency_penalty": np.float32, "length_penalty": np.float32,
            "beam_width": np.int32, "num_return_sequences": np.int32, "return_log_probs": np.bool_,
            "top_log_probs": np.int32,
            "prompt_table_extra_id": np.uint64}


def data_url(image) -> str:
    """An image (a path, encoded bytes, a PIL image or an (H, W, 3) uint8 array) as a PNG data URL.
    The server decodes and checks it."""
    if isinstance(image, (str, Path)):
        image = Path(image).read_bytes()
    if isinstance(image, bytes):
        image = Image.open(io.BytesIO(image))
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def tensor(name: str, value) -> "InferInput":
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    arr = np.asarray(value)
    if arr.dtype.kind in "USO":
        arr = np.array([[v.encode() if isinstance(v, str) else v for v in np.atleast_1d(value)]], dtype=np.object_)
    elif arr.ndim == 0:
        arr = arr.reshape(1, 1)
    t = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
    t.set_data_from_numpy(arr)
    return t


def request_inputs(prompt: str, max_tokens: int, image=None, stream: bool = True, stop_words=(), bad_words=(),
                   guide: tuple[str, str] | None = None, **optional) -> list:
    """The model's input tensors; `guide` is structured output's (type, guide), TensorRT-LLM's
    guided_decoding_guide_type and guided_decoding_guide."""
    inputs = [tensor("text_input", [prompt]), tensor("max_tokens", np.int32(max_tokens)),
              tensor("stream", np.bool_(stream))]
    if guide is not None:
        inputs += [tensor("guided_decoding_guide_type", [guide[0]]), tensor("guided_decoding_guide", [guide[1]])]
    if image is not None:
        inputs.append(tensor("image_url_input", [data_url(image)]))
    for name, words in (("stop_words", stop_words), ("bad_words", bad_words)):
        if words:
            inputs.append(tensor(name, list(words)))
    for name, value in optional.items():
        if name not in OPTIONAL:
            raise ValueError(f"unknown input {name}")
        inputs.append(tensor(name, OPTIONAL[name](value)))
    return inputs


def served_engine_dir(client, model: str) -> str:
    """The engine directory behind `model`, from its config's parameters (set by package)."""
    config = client.get_model_config(model, as_json=True)["config"]
    try:
        return config["parameters"]["engine_dir"]["string_value"]
    except KeyError:
        raise ValueError(f"model '{model}' has no engine_dir parameter: not packaged by pdrop") from None


def served_drop_ratio(client, model: str) -> float:
    """The drop ratio of the engine behind `model`, from its config's parameters (set by package)."""
    config = client.get_model_config(model, as_json=True)["config"]
    try:
        return float(config["parameters"]["drop_ratio"]["string_value"])
    except KeyError:
        raise ValueError(f"model '{model}' has no drop_ratio parameter: not packaged by pdrop") from None


@dataclass
class Answer:
    """What one request got back: text, token ids, per-response arrival times, outputs of the last;
    with return_log_probs, every token's log-probability and its alternatives' ids, in order."""
    text: str = ""
    ids: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    top_ids: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # perf_counter at each response
    sent: float = 0.0
    last: dict = field(default_factory=dict)
    error: str | None = None


def infer(client, model: str, inputs: list, timeout: float = 120.0, request_id: str = "0") -> Answer:
    """Send one request on a fresh stream of `client` and collect every response until the final one."""
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error, time.perf_counter())))
    answer = Answer(sent=time.perf_counter())
    final = False
    try:
        client.async_stream_infer(model, inputs, request_id=request_id, enable_empty_final_response=True)
        while True:
            result, error, at = responses.get(timeout=timeout)
            if error is not None:  # an error response is the last one
                answer.error, final = str(error), True
                return answer
            final = result.get_response().parameters["triton_final_response"].bool_param
            text = result.as_numpy("text_output")
            if text is not None:
                answer.times.append(at)
                answer.text += b"".join(text.reshape(-1)).decode("utf-8")
                answer.ids += result.as_numpy("output_ids").reshape(-1).tolist()
                answer.last = {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}
                if "output_log_probs" in answer.last:
                    answer.log_probs += answer.last["output_log_probs"].reshape(-1).tolist()
                    answer.top_ids += answer.last["output_top_ids"].reshape(-1).tolist()
            if final:
                return answer
    finally:
        # cancel only what is unfinished: tritonserver 2.51 keeps a stream cancelled after its final
        # response referenced, and then waits its whole exit timeout at shutdown
        client.stop_stream(cancel_requests=not final)
