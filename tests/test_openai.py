"""The OpenAI-compatible frontend against a real tritonserver, driven by the real `openai` package."""
from __future__ import annotations

import threading
import time
import urllib.request

import httpx
import openai
import pytest
from conftest import make_image
from prometheus_client.parser import text_string_to_metric_families

from builder.client.grpc import data_url
from builder.frontend.server import OpenAIServer
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
    ([], 400, "non-empty list"),
])
def test_bad_requests_get_openai_errors(client, messages, status, message):
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="pdrop", messages=messages, max_tokens=4)
    assert e.value.status_code == status and message in e.value.body["message"]


def test_errors_from_the_model_come_back_as_400(client):
    with pytest.raises(openai.BadRequestError, match="temperature must be >= 0"):
        client.completions.create(model="pdrop", prompt="hi", max_tokens=4, temperature=-1)
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
        chat_prompt(tokenizer, chat_messages(QUESTION, make_image(60, 80)))


def test_a_conversation_renders_every_role_with_the_template(engine_dir):
    from transformers import AutoTokenizer

    from builder.frontend.openai_api import chat_prompt

    prompt, image = chat_prompt(AutoTokenizer.from_pretrained(engine_dir), [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}, {"role": "user", "content": "Again"}])
    assert prompt == "Be brief. USER: Hi ASSISTANT: Hello</s>USER: Again ASSISTANT:" and image is None
