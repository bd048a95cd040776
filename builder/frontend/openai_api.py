"""OpenAI-compatible HTTP API in front of the Triton server, as vLLM and trtllm-serve answer it.

Every request becomes one streamed gRPC request to the served model (the decoupled model answers
token by token), so the server does the work and this process only translates: chat messages are
rendered with the checkpoint's own chat template (the engine's tokenizer files), an `image_url` part
travels as the model's `image_url_input` (`data:` URLs only: the server never fetches), and
responses come back as OpenAI JSON or server-sent events. A client that disconnects cancels its
gRPC stream, so the model retires the request and frees its KV blocks at the next step.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

import tritonclient.grpc.aio as grpcaio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..client.grpc import request_inputs, tensor
from .protocol import ChatCompletionRequest, CompletionRequest, Message, parse

DEFAULT_MAX_TOKENS = 256
# what the model's error lines start with -> (HTTP status, OpenAI error type); the rest are 400s
MODEL_ERRORS = {"server busy": (429, "rate_limit_error"), "generation failed": (500, "server_error"),
                "the CUDA device": (503, "service_unavailable_error")}


def model_error(message: str) -> "ApiError":
    """The model's one-line error as OpenAI's: a bad request unless its first words say otherwise
    (SDKs retry 429 and 503, not 400)."""
    status, kind = next((v for k, v in MODEL_ERRORS.items() if message.startswith(k)), (400, "invalid_request_error"))
    return ApiError(status, message, kind)


def body_limit(max_image_pixels: int) -> int:
    """Bytes a request body may have by default: an image at one byte a pixel (compressed photos
    take less), base64-encoded, and 1 MiB of text."""
    return max_image_pixels * 4 // 3 + (1 << 20)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


def error_body(message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def chat_prompt(tokenizer, messages: list[Message]) -> tuple[str, str | None]:
    """Parsed chat messages -> (prompt rendered with the checkpoint's chat template, the image's data URL)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this checkpoint has no chat template: use /v1/completions with a raw prompt")
    rendered, images = [], []
    for m in messages:
        if isinstance(m.content, str):
            rendered.append({"role": m.role, "content": [{"type": "text", "text": m.content}]})
            continue
        out = []
        for part in m.content:
            if part.type == "text":
                out.append({"type": "text", "text": part.text})
                continue
            if not part.image_url.url.startswith("data:"):
                raise ApiError(400, "image_url must be a data: URL (data:image/...;base64,...): "
                                    "this server never fetches remote images")
            images.append(part.image_url.url)
            out.append({"type": "image"})
        rendered.append({"role": m.role, "content": out})  # parts, as multimodal processors' templates read them
    if len(images) > 1:
        raise ApiError(400, f"one image per request is supported, got {len(images)}")
    prompt = tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False)
    return prompt, images[0] if images else None


def sampling(req: ChatCompletionRequest | CompletionRequest) -> tuple[int, list[str], dict]:
    """max_tokens, stop strings and the model's optional inputs from a parsed request; top_p 0 is
    greedy, as in vLLM (the model reads top_p 0 as "off")."""
    max_tokens = req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS
    stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
    greedy = req.top_p == 0
    optional = {"temperature": 0.0 if greedy else req.temperature, "top_p": 1.0 if greedy else req.top_p,
                "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
                "min_tokens": req.min_tokens}
    if req.seed is not None:
        optional["seed"] = req.seed
    if req.ignore_eos:
        optional["end_id"] = -1
    if req.alternatives is not None:
        optional |= {"return_log_probs": True, "top_log_probs": req.alternatives}
    return max_tokens, stop, optional


class Frontend:
    def __init__(self, grpc_url: str, model: str, tokenizer):
        self.grpc_url, self.model, self.tokenizer = grpc_url, model, tokenizer

    async def ready(self) -> bool:
        """The Triton server live and the model loaded."""
        try:
            async with grpcaio.InferenceServerClient(self.grpc_url) as client:
                return await client.is_server_live() and await client.is_model_ready(self.model)
        except Exception:  # unreachable: not ready, whatever the error
            return False

    async def generate(self, prompt: str, image: str | None, req: ChatCompletionRequest | CompletionRequest):
        """Yield (text delta, final outputs or None, the token's log-probabilities or None) from the
        served model, one per token."""
        max_tokens, stop, optional = sampling(req)
        inputs = request_inputs(prompt, max_tokens, None, stream=True, stop_words=stop, guide=req.guide, **optional)
        if image is not None:
            inputs.append(tensor("image_url_input", [image]))

        async def requests():
            yield {"model_name": self.model, "inputs": inputs, "request_id": uuid.uuid4().hex}

        async with grpcaio.InferenceServerClient(self.grpc_url) as client:
            async for result, error in client.stream_infer(requests()):
                if error is not None:
                    raise model_error(error.message() if hasattr(error, "message") else str(error))
                text = result.as_numpy("text_output").reshape(-1)[0].decode()
                finish = result.as_numpy("finish_reason")
                finish = finish.reshape(-1)[0].decode() if finish is not None else ""
                final = {"finish_reason": finish,
                         "prompt_tokens": int(result.as_numpy("prompt_tokens").reshape(-1)[0]),
                         "completion_tokens": int(result.as_numpy("output_tokens").reshape(-1)[0])} if finish else None
                yield text, final, token_logprobs(result)
                if final:
                    return


def token_logprobs(result) -> list[tuple[int, float, list[tuple[int, float]]]] | None:
    """(token id, logprob, [(id, logprob) of the alternatives]) of each token of one response, when
    the request asked for them."""
    values = result.as_numpy("output_log_probs")
    if values is None:
        return None
    ids, top_ids = result.as_numpy("output_ids").reshape(-1), result.as_numpy("output_top_ids").reshape(-1)
    top_values, values = result.as_numpy("output_top_log_probs").reshape(-1), values.reshape(-1)
    k = len(top_ids) // max(len(ids), 1)
    return [(int(i), float(v), list(zip(top_ids[j * k:(j + 1) * k].tolist(), top_values[j * k:(j + 1) * k].tolist())))
            for j, (i, v) in enumerate(zip(ids, values))]


def chat_logprobs(tokenizer, tokens) -> dict:
    """OpenAI chat's `logprobs`: each token's text, bytes, logprob and its alternatives'."""
    def entry(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(i, lp), "top_logprobs": [entry(j, v) for j, v in top]} for i, lp, top in tokens]}


def completion_logprobs(tokenizer, tokens, offset: int) -> dict:
    """The legacy completions' `logprobs`: tokens, their logprobs, alternatives as {token: logprob},
    and each token's offset in the text (from `offset`)."""
    texts = [tokenizer.decode([i]) for i, _, _ in tokens]
    offsets = [offset + sum(len(t) for t in texts[:n]) for n in range(len(texts))]
    return {"tokens": texts, "token_logprobs": [lp for _, lp, _ in tokens],
            "top_logprobs": [{tokenizer.decode([j]): v for j, v in top} for _, _, top in tokens],
            "text_offset": offsets}


def create_app(frontend: Frontend, max_body_bytes: int) -> FastAPI:
    app = FastAPI(title="pdrop OpenAI-compatible API")

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return JSONResponse(error_body(str(e), e.kind), status_code=e.status)

    @app.exception_handler(Exception)
    async def _unexpected(_, e: Exception):  # a bug: still OpenAI's JSON, never a plain-text 500
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)

    @app.get("/health")
    async def health():  # vLLM's: 200 while the model can answer, else 503
        return Response(status_code=200 if await frontend.ready() else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": frontend.model, "object": "model", "created": 0,
                                            "owned_by": "pdrop"}]}

    async def body_of(request: Request, kind: type[ChatCompletionRequest | CompletionRequest]):
        """The body, read up to max_body_bytes (413 past it, before any of it is decoded), parsed."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise ApiError(413, f"the request body is {int(declared)} bytes: at most {max_body_bytes} are taken")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise ApiError(413, f"the request body is over {max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            req = parse(kind, b"".join(chunks))
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        if req.model not in (None, frontend.model):
            raise ApiError(404, f"model '{req.model}' is not served here: '{frontend.model}' is", "not_found_error")
        return req

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await body_of(request, ChatCompletionRequest)
        prompt, image = chat_prompt(frontend.tokenizer, req.messages)
        return await answer(request, req, prompt, image, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await body_of(request, CompletionRequest)
        return await answer(request, req, req.prompt, None, chat=False)

    async def answer(request: Request, req, prompt: str, image: str | None, chat: bool):
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        kind = "chat.completion" if chat else "text_completion"
        created = int(time.time())
        stream = frontend.generate(prompt, image, req)

        def logprobs_of(tokens, offset: int) -> dict:  # `offset`: characters of the answer before them
            return (chat_logprobs(frontend.tokenizer, tokens) if chat
                    else completion_logprobs(frontend.tokenizer, tokens, offset))

        if not req.stream:
            text, final, tokens = await until_disconnected(request, collect(stream))
            choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            if tokens is not None:
                choice["logprobs"] = logprobs_of(tokens, 0)
            return {"id": ident, "object": kind, "created": created, "model": frontend.model,
                    "choices": [{"index": 0, **choice, "finish_reason": final["finish_reason"]}],
                    "usage": usage(final)}
        first = await anext(stream)  # errors before the first token are still an HTTP status
        include_usage = req.stream_options is not None and req.stream_options.include_usage

        async def events():
            chunk_kind = "chat.completion.chunk" if chat else "text_completion"
            delta, final, tokens = first
            sent = 0  # characters so far: the legacy logprobs' text offsets
            try:
                if chat:
                    role = {"delta": {"role": "assistant", "content": ""}}
                    yield sse(ident, chunk_kind, created, frontend.model, role)
                while True:
                    part = {"delta": {"content": delta}} if chat else {"text": delta}
                    if tokens is not None:
                        part["logprobs"] = logprobs_of(tokens, sent)
                    sent += len(delta)
                    yield sse(ident, chunk_kind, created, frontend.model, {**part, "finish_reason": None})
                    if final:
                        break
                    delta, final, tokens = await anext(stream)
            except Exception as e:  # after the status went out: an error event, then the stream's end
                status, kind_ = (e.status, e.kind) if isinstance(e, ApiError) else (500, "server_error")
                yield f"data: {json.dumps({**error_body(str(e), kind_), 'status': status})}\n\ndata: [DONE]\n\n"
                return
            finally:  # the client gone: closing the gRPC stream cancels the request on the server
                await stream.aclose()
            done = {"delta": {}} if chat else {"text": ""}
            last = sse(ident, chunk_kind, created, frontend.model, {**done, "finish_reason": final["finish_reason"]},
                       usage(final) if include_usage else None)
            yield last + "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


async def collect(stream) -> tuple[str, dict, list | None]:
    """A whole answer: its text, final outputs and its tokens' log-probabilities (None unless asked)."""
    text, final, tokens = [], None, None
    async for delta, final, some in stream:
        text.append(delta)
        if some is not None:
            tokens = (tokens or []) + some
    return "".join(text), final, tokens


async def until_disconnected(request: Request, work, poll_s: float = 0.25):
    """`work`'s result; if the client goes away first, `work` is cancelled (which closes its gRPC
    stream: the model retires the request at its next step) and so is this handler."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=poll_s)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                raise asyncio.CancelledError
        return task.result()
    finally:
        task.cancel()


def usage(final: dict) -> dict:
    return {"prompt_tokens": final["prompt_tokens"], "completion_tokens": final["completion_tokens"],
            "total_tokens": final["prompt_tokens"] + final["completion_tokens"]}


def sse(ident: str, kind: str, created: int, model: str, choice: dict, usage: dict | None = None) -> str:
    event = {"id": ident, "object": kind, "created": created, "model": model, "choices": [{"index": 0, **choice}]}
    if usage is not None:
        event["usage"] = usage
    return f"data: {json.dumps(event)}\n\n"
