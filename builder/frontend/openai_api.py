"""OpenAI-compatible HTTP API in front of the Triton server, as vLLM and trtllm-serve answer it.

Every request becomes one streamed gRPC request to the served model (the decoupled model answers
token by token), so the server does the work and this process only translates: chat messages are
rendered with the checkpoint's own chat template (the engine's tokenizer files), an `image_url` part
travels as the model's `image_url_input` (`data:` URLs only: the server never fetches), and
responses come back as OpenAI JSON or server-sent events. A client that disconnects cancels its
gRPC stream, so the model retires the request and frees its KV blocks at the next step.
"""
from __future__ import annotations

import json
import time
import uuid

import tritonclient.grpc.aio as grpcaio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..client.grpc import request_inputs, tensor

DEFAULT_MAX_TOKENS = 256


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


def error_body(message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def chat_prompt(tokenizer, messages) -> tuple[str, str | None]:
    """OpenAI chat messages -> (prompt rendered with the checkpoint's chat template, the image's data URL)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this checkpoint has no chat template: use /v1/completions with a raw prompt")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list")
    rendered, images = [], []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, "each message needs a role: system, user or assistant")
        content = m.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise ApiError(400, "message content must be a string or a list of parts")
        out = []
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                out.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                url = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) else None
                if not isinstance(url, str) or not url.startswith("data:"):
                    raise ApiError(400, "image_url must be a data: URL (data:image/...;base64,...): "
                                        "this server never fetches remote images")
                images.append(url)
                out.append({"type": "image"})
            else:
                raise ApiError(400, f"unsupported content part {kind!r}: text and image_url are supported")
        rendered.append({"role": m["role"], "content": out})  # parts, as multimodal processors' templates read them
    if len(images) > 1:
        raise ApiError(400, f"one image per request is supported, got {len(images)}")
    prompt = tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False)
    return prompt, images[0] if images else None


def sampling(body: dict) -> tuple[int, list[str], dict]:
    """max_tokens, stop strings and the model's optional inputs from an OpenAI request body."""
    if body.get("n", 1) != 1:
        raise ApiError(400, "n must be 1: one answer per request")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens")) or DEFAULT_MAX_TOKENS
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(max_tokens, int) or not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "max_tokens must be an integer and stop a string or a list of strings")
    optional = {"temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
                "presence_penalty": body.get("presence_penalty", 0.0),
                "frequency_penalty": body.get("frequency_penalty", 0.0)}
    # vLLM's extensions of the same meaning
    for name, value in (("seed", body.get("seed")), ("min_tokens", body.get("min_tokens")),
                        ("end_id", -1 if body.get("ignore_eos") else None)):
        if value is not None:
            optional[name] = value
    for name, value in optional.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ApiError(400, f"{name} must be a number")
    return max_tokens, stop, optional


class Frontend:
    def __init__(self, grpc_url: str, model: str, tokenizer):
        self.grpc_url, self.model, self.tokenizer = grpc_url, model, tokenizer

    async def generate(self, prompt: str, image: str | None, body: dict):
        """Yield (text delta, final outputs or None) from the served model, one per token."""
        max_tokens, stop, optional = sampling(body)
        inputs = request_inputs(prompt, max_tokens, None, stream=True, stop_words=stop, **optional)
        if image is not None:
            inputs.append(tensor("image_url_input", [image]))

        async def requests():
            yield {"model_name": self.model, "inputs": inputs, "request_id": uuid.uuid4().hex}

        async with grpcaio.InferenceServerClient(self.grpc_url) as client:
            async for result, error in client.stream_infer(requests()):
                if error is not None:  # the model's one-line error: a bad request, unless generation failed
                    message = error.message() if hasattr(error, "message") else str(error)
                    failed = message.startswith("generation failed")
                    raise ApiError(500 if failed else 400, message, "server_error" if failed else
                                   "invalid_request_error")
                text = result.as_numpy("text_output").reshape(-1)[0].decode()
                finish = result.as_numpy("finish_reason")
                finish = finish.reshape(-1)[0].decode() if finish is not None else ""
                final = {"finish_reason": finish,
                         "prompt_tokens": int(result.as_numpy("prompt_tokens").reshape(-1)[0]),
                         "completion_tokens": int(result.as_numpy("output_tokens").reshape(-1)[0])} if finish else None
                yield text, final
                if final:
                    return


def create_app(frontend: Frontend) -> FastAPI:
    app = FastAPI(title="pdrop OpenAI-compatible API")

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return JSONResponse(error_body(str(e), e.kind), status_code=e.status)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": frontend.model, "object": "model", "created": 0,
                                            "owned_by": "pdrop"}]}

    async def body_of(request: Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body must be JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if body.get("model") not in (None, frontend.model):
            raise ApiError(404, f"model '{body.get('model')}' is not served here: '{frontend.model}' is",
                           "not_found_error")
        return body

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await body_of(request)
        prompt, image = chat_prompt(frontend.tokenizer, body.get("messages"))
        return await answer(body, prompt, image, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "prompt must be a non-empty string")
        return await answer(body, prompt, None, chat=False)

    async def answer(body: dict, prompt: str, image: str | None, chat: bool):
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        kind = "chat.completion" if chat else "text_completion"
        created = int(time.time())
        stream = frontend.generate(prompt, image, body)
        if not body.get("stream"):
            text, final = [], None
            async for delta, final in stream:
                text.append(delta)
            choice = ({"message": {"role": "assistant", "content": "".join(text)}} if chat
                      else {"text": "".join(text)})
            return {"id": ident, "object": kind, "created": created, "model": frontend.model,
                    "choices": [{"index": 0, **choice, "finish_reason": final["finish_reason"]}],
                    "usage": usage(final)}
        first = await anext(stream)  # errors before the first token are still an HTTP status

        async def events():
            chunk_kind = "chat.completion.chunk" if chat else "text_completion"
            delta, final = first
            try:
                if chat:
                    role = {"delta": {"role": "assistant", "content": ""}}
                    yield sse(ident, chunk_kind, created, frontend.model, role)
                while True:
                    part = {"delta": {"content": delta}} if chat else {"text": delta}
                    yield sse(ident, chunk_kind, created, frontend.model, {**part, "finish_reason": None})
                    if final:
                        break
                    delta, final = await anext(stream)
            finally:  # the client gone: closing the gRPC stream cancels the request on the server
                await stream.aclose()
            done = {"delta": {}} if chat else {"text": ""}
            last = sse(ident, chunk_kind, created, frontend.model, {**done, "finish_reason": final["finish_reason"]},
                       usage(final) if (body.get("stream_options") or {}).get("include_usage") else None)
            yield last + "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def usage(final: dict) -> dict:
    return {"prompt_tokens": final["prompt_tokens"], "completion_tokens": final["completion_tokens"],
            "total_tokens": final["prompt_tokens"] + final["completion_tokens"]}


def sse(ident: str, kind: str, created: int, model: str, choice: dict, usage: dict | None = None) -> str:
    event = {"id": ident, "object": kind, "created": created, "model": model, "choices": [{"index": 0, **choice}]}
    if usage is not None:
        event["usage"] = usage
    return f"data: {json.dumps(event)}\n\n"
