"""OpenAI request bodies as typed models (pydantic, as FastAPI and vLLM's protocol.py declare them).

Parsing a body is the one place where a request is refused for its shape: invalid JSON (a lone
surrogate, nesting past pydantic's bound), a wrong type (strict: no `true` for an integer, no "1"
for a number), a value out of range, and any field this server does not implement (`tools`,
`logit_bias`, ...: `extra="forbid"`) each become one 400 line naming the field.
"""
from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

INT32_MAX = 2 ** 31 - 1  # max_tokens travels as the model's INT32
UINT64_MAX = 2 ** 64 - 1  # seed travels as the model's UINT64


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[Part]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchema(_Strict):
    name: str
    schema_: dict = Field(alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class _Sampling(_Strict):
    """The fields both endpoints share. `n`, when sent, must be 1 (one answer per request)."""
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=UINT64_MAX)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the caller's own records; it changes no answer
    response_format: ResponseFormat | None = None
    # vLLM's extensions
    min_tokens: int = Field(0, ge=0, le=INT32_MAX)
    ignore_eos: bool = False
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None  # EBNF (GBNF)

    @model_validator(mode="after")
    def _one_guide(self):
        asked = [n for n in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
                 if getattr(self, n) is not None]
        if self.response_format is not None and self.response_format.type != "text":
            asked.append("response_format")
        if len(asked) > 1:
            raise ValueError(f"one of {', '.join(asked)} at a time")
        rf = self.response_format
        if rf is not None and (rf.type == "json_schema") != (rf.json_schema is not None):
            raise ValueError("response_format: json_schema goes with type json_schema, and only with it")
        return self

    @property
    def guide(self) -> tuple[str, str] | None:
        """The model's guided decoding (type, guide), TensorRT-LLM's names; None for free text."""
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            return "json", ""
        if rf is not None and rf.type == "json_schema":
            return "json_schema", json.dumps(rf.json_schema.schema_)
        if self.guided_json is not None:
            schema = self.guided_json
            return "json_schema", schema if isinstance(schema, str) else json.dumps(schema)
        if self.guided_regex is not None:
            return "regex", self.guided_regex
        if self.guided_choice is not None:  # one of the strings, exactly: Lark string literals are JSON's
            return "lark", "start: " + " | ".join(json.dumps(c) for c in self.guided_choice)
        if self.guided_grammar is not None:
            return "ebnf_grammar", self.guided_grammar
        return None


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def alternatives(self) -> int | None:
        """Log-probabilities asked for: None, or the alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=5)  # the legacy API's: alternatives per token

    @property
    def alternatives(self) -> int | None:
        return self.logprobs


def parse(model: type[_Sampling], raw: bytes) -> _Sampling:
    """The body as `model`; ValueError with one line naming what is wrong."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        # of a union's alternatives (content: a string or a list of parts), the one that got furthest
        raise ValueError(describe(max(e.errors(), key=lambda err: len(err["loc"])))) from None


def describe(error: dict) -> str:
    # loc also names the union alternative taken ("str", "list[tagged-union[...]]"): not the body's words
    where = ".".join(str(p) for p in error["loc"] if not (isinstance(p, str) and ("[" in p or p == "str")))
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"unsupported field '{where}': this server does not implement it"
    if kind == "union_tag_invalid":
        return f"unsupported content part {error['ctx']['tag']!r} at {where}: text and image_url are supported"
    if kind == "json_invalid":
        return f"the request body is not valid JSON: {error['msg'].removeprefix('Invalid JSON: ')}"
    if kind == "model_type" and not where:
        return "the request body must be a JSON object"
    return f"{where}: {error['msg']}" if where else error["msg"]
