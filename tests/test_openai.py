"""The OpenAI-compatible frontend against a real tritonserver, driven by the real `openai` package."""
from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.request

import httpx
import openai
import pytest
from conftest import make_image
from prometheus_client.parser import text_string_to_metric_families

from builder.client.grpc import data_url
from builder.format.manifest import read_manifest
from builder.frontend.openai_api import body_limit
from builder.frontend.server import OpenAIServer
from builder.runtime.sampling import SamplingParams
from builder.serve.launcher import TritonServer, free_port
from builder.serve.package import package_repo

QUESTION = "What is in the picture?"


@pytest.fixture(scope="module")
def served(engine_dir, tmp_path_factory):
    repo = package_repo(engine_dir, tmp_path_factory.mktemp("repo") / "models").parent
    with TritonServer(repo, log_path=tmp_path_factory.mktemp("log") / "triton.log") as triton:
        with OpenAIServer(triton.grpc_url, "pdrop", "127.0.0.1", free_port()) as api:
            yield triton, api


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[1].url, api_key="unused", max_retries=0, timeout=120)


def offline_chat(engine, question, image, n):
    return engine.generate([engine.chat_prompt(question, image is not None)], [image], max_new_tokens=n)[0]


def typed(messages: list[dict]):
    """Chat messages as the frontend parses them."""
    from builder.frontend.protocol import ChatCompletionRequest

    return ChatCompletionRequest.model_validate({"messages": messages}).messages


def chat_messages(question, image):
    content = [{"type": "text", "text": question}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": data_url(image)}})
    return [{"role": "user", "content": content}]


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["pdrop"]


def test_chat_with_an_image_equals_the_offline_chat_answer(client, engine, images):
    want = offline_chat(engine, QUESTION, images[0], 12)
    got = client.chat.completions.create(model="pdrop", messages=chat_messages(QUESTION, images[0]),
                                         max_tokens=12, temperature=0)
    assert got.choices[0].message.content == want.text and got.choices[0].finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == want.prompt_tokens > want.image_tokens > 0  # image tokens included
    assert got.usage.completion_tokens == len(want.token_ids) == 12


def test_streamed_chat_equals_the_offline_chat_answer(client, engine, images):
    want = offline_chat(engine, QUESTION, images[1], 10)
    chunks = list(client.chat.completions.create(model="pdrop", messages=chat_messages(QUESTION, images[1]),
                                                 max_completion_tokens=10, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens == want.prompt_tokens


def test_completions_take_a_raw_prompt(client, engine):
    prompt = "USER: count to ten ASSISTANT:"
    want = engine.generate([prompt], max_new_tokens=8)[0]
    got = client.completions.create(model="pdrop", prompt=prompt, max_tokens=8, temperature=0)
    assert got.choices[0].text == want.text and got.usage.completion_tokens == len(want.token_ids)


def test_concurrent_streams_do_not_mix(served, engine, images):
    cases = [(f"{QUESTION} ({i})", images[i % len(images)], 6 + i % 3) for i in range(4)]
    got = [None] * len(cases)

    def worker(i):
        c = openai.OpenAI(base_url=served[1].url, api_key="unused", max_retries=0, timeout=120)
        question, image, n = cases[i]
        stream = c.chat.completions.create(model="pdrop", messages=chat_messages(question, image), max_tokens=n,
                                           temperature=0, stream=True)
        got[i] = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == [offline_chat(engine, q, im, n).text for q, im, n in cases]


@pytest.mark.parametrize("messages, status, message", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}],
     400, "never fetches"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], 400, "unsupported content part"),
    ([], 400, "messages: List should have at least 1 item"),
])
def test_bad_requests_get_openai_errors(client, messages, status, message):
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="pdrop", messages=messages, max_tokens=4)
    assert e.value.status_code == status and message in e.value.body["message"]


def test_errors_from_the_model_come_back_as_400(client):
    with pytest.raises(openai.BadRequestError, match=r"exceeds this engine's max_seq_len \(2048\)"):
        client.completions.create(model="pdrop", prompt="hi", max_tokens=5000)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-4o", prompt="hi", max_tokens=4)


def used_blocks(triton) -> float:
    text = urllib.request.urlopen(triton.metrics_url, timeout=10).read().decode()
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "nv_trt_llm_kv_cache_block_metrics" and s.labels["kv_cache_block_type"] == "used")


def test_a_client_that_disconnects_frees_its_kv_blocks(served, images):
    triton, api = served
    body = {"model": "pdrop", "messages": chat_messages(QUESTION, images[0]), "max_tokens": 1500, "stream": True,
            "temperature": 0, "ignore_eos": True}
    with httpx.Client(timeout=120) as http, http.stream("POST", f"{api.url}/chat/completions", json=body) as r:
        lines = r.iter_lines()  # one iterator: dropping one closes the response, a disconnect too early
        assert next(lines).startswith("data: ")  # the first token came: the request holds its blocks
        wait_for(lambda: used_blocks(triton) > 0, "the metrics never showed the request's blocks")
    wait_for(lambda: used_blocks(triton) == 0, "the disconnected request still holds KV blocks")


def wait_for(condition, message: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.1)


def test_a_checkpoint_without_a_chat_template_is_refused_by_name(engine_dir):
    from transformers import AutoTokenizer

    from builder.frontend.openai_api import ApiError, chat_prompt

    tokenizer = AutoTokenizer.from_pretrained(engine_dir)
    tokenizer.chat_template = None
    with pytest.raises(ApiError, match="no chat template"):
        chat_prompt(tokenizer, typed(chat_messages(QUESTION, make_image(60, 80))))


def test_a_conversation_renders_every_role_with_the_template(engine_dir):
    from transformers import AutoTokenizer

    from builder.frontend.openai_api import chat_prompt

    prompt, image = chat_prompt(AutoTokenizer.from_pretrained(engine_dir), typed([
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}, {"role": "user", "content": "Again"}]))
    assert prompt == "Be brief. USER: Hi ASSISTANT: Hello</s>USER: Again ASSISTANT:" and image is None


HI = [{"role": "user", "content": "hi"}]


def post(url: str, body: bytes | dict, timeout: float | httpx.Timeout = 60) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}/chat/completions", content=content, headers={"content-type": "application/json"},
                      timeout=timeout)


@pytest.mark.parametrize("body, status, message", [
    ({"messages": HI, "seed": 2 ** 70}, 400, "seed: Input should be less than or equal to 18446744073709551615"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "not valid JSON"),
    (b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, "recursion limit exceeded"),
    ({"messages": HI, "stream": True, "stream_options": True}, 400, "stream_options: Input should be an object"),
    ({"messages": HI, "max_tokens": 2 ** 31}, 400, "max_tokens: Input should be less than or equal to 2147483647"),
    ({"messages": HI, "max_tokens": 0}, 400, "max_tokens: Input should be greater than or equal to 1"),
    ({"messages": HI, "max_tokens": True}, 400, "max_tokens: Input should be a valid integer"),
    ({"messages": HI, "n": 2}, 400, "n: Input should be less than or equal to 1"),
    ({"messages": HI, "top_logprobs": 2}, 400, "top_logprobs needs logprobs: true"),
    ({"messages": HI, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs: Input should be less than or equal to 20"),
    ({"messages": HI, "response_format": {"type": "json_schema"}}, 400, "json_schema goes with type json_schema"),
    ({"messages": HI, "guided_regex": "a", "guided_choice": ["b"]}, 400, "one of guided_regex, guided_choice at a time"),
    ({"messages": HI, "guided_regex": "("}, 400, "the regex guide does not compile"),
    ({"messages": HI, "tools": []}, 400, "unsupported field 'tools'"),
    ({"messages": HI, "logit_bias": {"1": 5}}, 400, "unsupported field 'logit_bias'"),
    ({"messages": HI, "temperature": "hot"}, 400, "temperature: Input should be a valid number"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role"),
    (b"not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    ({"messages": HI, "model": "gpt-4o"}, 404, "not served here"),
])
def test_hostile_bodies_get_openai_errors_and_the_server_goes_on(served, body, status, message):
    r = post(served[1].url, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"] and "\n" not in error["message"]
    ok = post(served[1].url, {"messages": HI, "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_a_body_over_the_limit_is_refused_before_it_is_read(served):
    """A declared 100 MB body is refused from its header; a chunked one once past the limit."""
    url = served[1].url
    limit = body_limit(read_manifest(served_engine(served), verify=False).limits.max_image_pixels)
    with socket.create_connection(("127.0.0.1", int(url.split(":")[2].split("/")[0])), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: 100000000\r\n\r\n{\"messages\": ")
        reply = b""
        while b'"}}' not in reply and (chunk := s.recv(65536)):
            reply += chunk
    head, _, body = reply.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 413") and "at most" in json.loads(body)["error"]["message"]

    def chunks():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(limit // (1 << 20) + 2):
            yield b"a" * (1 << 20)
        yield b'"}]}'

    r = httpx.post(f"{url}/chat/completions", content=chunks(), timeout=60)
    assert r.status_code == 413 and f"over {limit} bytes" in r.json()["error"]["message"]
    assert post(url, {"messages": HI, "max_tokens": 2}).status_code == 200


def served_engine(served) -> str:
    import tritonclient.grpc as grpcclient

    from builder.client.grpc import served_engine_dir

    with grpcclient.InferenceServerClient(served[0].grpc_url) as c:
        return served_engine_dir(c, "pdrop")


def test_top_p_0_is_greedy(client, engine):
    want = engine.generate(["USER: count to ten ASSISTANT:"], max_new_tokens=6)[0]
    got = client.completions.create(model="pdrop", prompt="USER: count to ten ASSISTANT:", max_tokens=6, top_p=0,
                                    temperature=1.5, seed=3)
    assert got.choices[0].text == want.text


def test_a_non_streaming_client_that_disconnects_frees_its_kv_blocks(served, images):
    triton, api = served
    body = {"model": "pdrop", "messages": chat_messages(QUESTION, images[0]), "max_tokens": 1500,
            "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        post(api.url, body, timeout=httpx.Timeout(60, read=1.0))
    wait_for(lambda: used_blocks(triton) == 0, "the disconnected request still holds KV blocks")


def test_health_says_whether_the_model_can_answer(served):
    assert httpx.get(served[1].url.removesuffix("/v1") + "/health", timeout=30).status_code == 200


@pytest.mark.parametrize("message, status", [
    ("server busy: 64 requests queued (--max-queued-requests); retry later", 429),
    ("the CUDA device cuda:0 is unusable after an error (x); this model refuses new requests", 503),
    ("generation failed: OutOfMemoryError: CUDA out of memory.", 500),
    ("temperature must be >= 0, got -1.0", 400),
])
def test_the_models_errors_keep_their_meaning_over_http(message, status):
    from builder.frontend.openai_api import model_error

    assert model_error(message).status == status


def test_chat_log_probabilities_are_the_engines(client, engine, images):
    """Unary and streamed: each token's logprob and its alternatives equal the engine's own (fp32,
    1e-4); greedy's token is its most likely."""
    prompt = engine.chat_prompt(QUESTION, True)
    [want] = engine.generate([prompt], [images[2]], params=[SamplingParams(6, logprobs=2)])
    got = client.chat.completions.create(model="pdrop", messages=chat_messages(QUESTION, images[2]), max_tokens=6,
                                         temperature=0, logprobs=True, top_logprobs=2)
    content = got.choices[0].logprobs.content
    stream = client.chat.completions.create(model="pdrop", messages=chat_messages(QUESTION, images[2]), max_tokens=6,
                                            temperature=0, logprobs=True, top_logprobs=2, stream=True)
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    for entries in (content, streamed):
        assert len(entries) == len(want.token_ids) == got.usage.completion_tokens
        for e, w in zip(entries, want.logprobs):
            assert e.logprob == pytest.approx(w.logprob, abs=1e-4)
            assert [t.logprob for t in e.top_logprobs] == pytest.approx([v for _, v in w.top], abs=1e-4)
            assert e.top_logprobs[0].token == e.token and e.bytes == list(e.token.encode())


def test_completion_log_probabilities_in_the_legacy_shape(client, engine):
    prompt = "USER: count to ten ASSISTANT:"
    [want] = engine.generate([prompt], params=[SamplingParams(5, logprobs=3)])
    got = client.completions.create(model="pdrop", prompt=prompt, max_tokens=5, temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([t.logprob for t in want.logprobs], abs=1e-4)
    for top, w in zip(lp.top_logprobs, want.logprobs):  # keyed by text: tokens that read alike share a key
        assert top and all(any(abs(v - x) < 1e-4 for _, x in w.top) for v in top.values())
    assert len(lp.tokens) == 5
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:n]) for n in range(5)]


SHAPE = {"type": "object", "additionalProperties": False, "required": ["shape", "n"],
         "properties": {"shape": {"enum": ["circle", "square"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}}}


def test_json_schema_answers_parse_and_validate_every_time(client, images):
    fmt = {"type": "json_schema", "json_schema": {"name": "shape", "schema": SHAPE, "strict": True}}
    for i in range(3):
        got = client.chat.completions.create(model="pdrop", messages=chat_messages(QUESTION, images[i]), max_tokens=40,
                                             temperature=1.0, seed=i, response_format=fmt)
        answer = json.loads(got.choices[0].message.content)
        assert set(answer) == {"shape", "n"} and answer["shape"] in ("circle", "square") and 0 <= answer["n"] <= 9
        assert got.choices[0].finish_reason == "stop"


def test_json_object_and_vllms_guided_fields(client):
    got = client.chat.completions.create(model="pdrop", messages=HI, max_tokens=60,
                                         response_format={"type": "json_object"})
    assert got.choices[0].finish_reason == "length" or isinstance(json.loads(got.choices[0].message.content), dict)
    choice = client.completions.create(model="pdrop", prompt="USER: pick ASSISTANT:", max_tokens=30,
                                       extra_body={"guided_choice": ["yes, surely", "no \"way\""]})
    assert choice.choices[0].text in ("yes, surely", 'no "way"')
    regex = client.completions.create(model="pdrop", prompt="USER: code ASSISTANT:", max_tokens=10,
                                      extra_body={"guided_regex": "[A-F]{2}-[0-9]"})
    assert re.fullmatch("[A-F]{2}-[0-9]", regex.choices[0].text)
