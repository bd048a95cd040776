"""A real tritonserver (from nvidia-pytriton) serving the demo engine over gRPC on loopback."""
from __future__ import annotations

import base64
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import make_image
from prometheus_client.parser import text_string_to_metric_families

from tritonclient.utils import np_to_triton_dtype

from builder.client.grpc import infer, request_inputs, served_drop_ratio, tensor
from builder import instance_device
from builder.cli import main
from builder.format.errors import ConfigError, EngineError
from builder.runtime.sampling import SamplingParams
from builder.serve.launcher import ServerError, TritonServer, free_port
from builder.serve.package import package_repo

PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"


@pytest.fixture(scope="module")
def repo(engine_dir, tmp_path_factory):
    return package_repo(engine_dir, tmp_path_factory.mktemp("repo") / "models").parent


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "triton.log"
    with TritonServer(repo, log_path=log) as s:
        yield s
    assert s.proc.returncode is not None


@pytest.fixture
def client(server):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


def offline(engine, prompt, image, **kw):
    return engine.generate([prompt], [image], **kw)[0]


def test_package_writes_a_valid_repository(repo, engine_dir):
    config = (repo / "pdrop" / "config.pbtxt").read_text()
    assert 'name: "pdrop"' in config and "decoupled: true" in config and "max_batch_size: 8" in config
    assert f'string_value: "{engine_dir.resolve()}"' in config
    assert 'key: "drop_ratio" value: { string_value: "0.5" }' in config
    assert 'key: "drop_layers" value: { string_value: "2,4,6" }' in config
    assert (repo / "pdrop" / "1" / "model.py").is_file()


def test_package_gpus_puts_an_engine_on_each_listed_gpu(engine_dir, tmp_path, capsys):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    def group(model):
        config = text_format.Parse((model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        [g] = config.instance_group
        return model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind), list(g.gpus), g.count

    assert group(package_repo(engine_dir, tmp_path / "cpu")) == ("KIND_CPU", [], 1)
    assert group(package_repo(engine_dir, tmp_path / "gpus", gpus=[0, 1, 2, 3], instances=2)) == (
        "KIND_GPU", [0, 1, 2, 3], 2)
    # what the model does with Triton's instance arguments: each instance its own GPU
    assert instance_device("auto", "GPU", "3") == "cuda:3"
    assert instance_device("cpu", "CPU", "0") == "cpu"
    for gpus, device, says in (([0, 0], "auto", "distinct GPU indices"), ([-1], "auto", "distinct GPU indices"),
                               ([0, 1], "cpu", "leave --device auto")):
        with pytest.raises(ConfigError, match=says):
            package_repo(engine_dir, tmp_path / "refused", gpus=gpus, device=device)
        assert not (tmp_path / "refused").exists()
    assert main(["package", "--engine", str(engine_dir), "--output", str(tmp_path / "x"), "--gpus", "a,b"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: --gpus takes comma-separated GPU indices like 0,1,2,3, got 'a,b'"]


def test_clients_read_the_engine_drop_ratio_from_the_server(server, client):
    assert served_drop_ratio(client, "pdrop") == 0.5


def test_a_repository_whose_drop_ratio_disagrees_with_its_engine_does_not_load(engine_dir, tmp_path):
    repo = package_repo(engine_dir, tmp_path / "models").parent
    config = repo / "pdrop" / "config.pbtxt"
    config.write_text(config.read_text().replace('string_value: "0.5"', 'string_value: "0.9"'))
    log = tmp_path / "triton.log"
    with pytest.raises(ServerError, match="exited with code 1 while starting"):
        TritonServer(repo, log_path=log).start(timeout=60)
    assert "config.pbtxt says drop_ratio 0.9 but the engine was built with 0.5" in log.read_text()


@pytest.mark.parametrize("stream", [True, False])
def test_served_greedy_answer_equals_offline(server, client, engine, images, stream):
    answer = infer(client, "pdrop", request_inputs(PROMPT, 12, images[0], stream=stream))
    assert answer.error is None
    expected = offline(engine, PROMPT, images[0], max_new_tokens=12)
    assert answer.ids == expected.token_ids and answer.text == expected.text
    assert len(answer.times) == (12 if stream else 1)
    last = answer.last
    assert last["output_tokens"].item() == 12 and last["finish_reason"].item() == b"length"
    assert last["image_tokens"].item() == expected.image_tokens
    assert last["stage_tokens_kept"].reshape(-1).tolist() == [s.tokens_kept for s in expected.stages]
    assert last["arrival_time_ns"].item() <= last["first_token_time_ns"].item() <= last["last_token_time_ns"].item()


@pytest.mark.parametrize("stream", [True, False])
def test_log_probabilities_come_as_tensorrtllm_backend_names_them(server, client, engine, images, stream):
    answer = infer(client, "pdrop", request_inputs(PROMPT, 5, images[0], stream=stream, return_log_probs=True,
                                                   top_log_probs=2))
    [want] = engine.generate([PROMPT], [images[0]], params=[SamplingParams(5, logprobs=2)])
    assert answer.error is None and answer.ids == want.token_ids
    assert answer.log_probs == pytest.approx([t.logprob for t in want.logprobs], abs=1e-5)
    assert answer.last["cum_log_probs"].item() == pytest.approx(sum(answer.log_probs), abs=1e-4)
    assert answer.top_ids == [i for t in want.logprobs for i, _ in t.top]
    plain = infer(client, "pdrop", request_inputs(PROMPT, 2, images[0]))
    assert "output_log_probs" not in plain.last


def test_guided_decoding_under_tensorrt_llms_names(server, client, images):
    schema = {"type": "object", "properties": {"size": {"enum": ["big", "small"]}}, "required": ["size"],
              "additionalProperties": False}
    answer = infer(client, "pdrop", request_inputs(PROMPT, 30, images[0], guide=("json_schema", json.dumps(schema))))
    assert answer.error is None and json.loads(answer.text) in ({"size": "big"}, {"size": "small"})
    bad = infer(client, "pdrop", request_inputs(PROMPT, 30, images[0], guide=("regex", "(")))
    assert bad.error is not None and "the regex guide does not compile" in bad.error


def test_prompt_table_extra_id_names_the_image_for_the_prefix_cache(server, client, engine, images):
    """TensorRT-LLM's key for reuse: requests that send one share the image's prefix by it, exactly."""
    for question in ("What is in the picture?", "Describe it in detail."):
        text = f"USER: <image>\n{question} ASSISTANT:"
        answer = infer(client, "pdrop", request_inputs(text, 8, images[2], prompt_table_extra_id=42))
        assert answer.error is None and answer.ids == offline(engine, text, images[2], max_new_tokens=8).token_ids


def test_per_request_drop_ratio_and_sampling(server, client, engine, images):
    kw = dict(temperature=0.8, top_k=20, seed=3)
    answer = infer(client, "pdrop", request_inputs(PROMPT, 6, images[1], drop_ratio=0.0, **kw))
    expected = engine.generate([PROMPT], [images[1]], max_new_tokens=6, drop_ratio=0.0, **kw)[0]
    assert answer.ids == expected.token_ids
    assert answer.last["stage_tokens_kept"].reshape(-1).tolist() == [expected.image_tokens] * 3


def test_concurrent_streams_do_not_mix(server, engine, images):
    cases = [(f"USER: <image>\nQuestion {i}? ASSISTANT:", images[i % len(images)], 6 + i % 3) for i in range(8)]
    answers = [None] * len(cases)

    def worker(i):
        c = grpcclient.InferenceServerClient(server.grpc_url)
        prompt, image, n = cases[i]
        answers[i] = infer(c, "pdrop", request_inputs(prompt, n, image), request_id=str(i))
        c.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for (prompt, image, n), answer in zip(cases, answers):
        assert answer.error is None
        assert answer.ids == offline(engine, prompt, image, max_new_tokens=n).token_ids
    assert max(a.last["batch_size"].item() for a in answers) > 1  # requests shared engine calls


def test_32_staggered_streams_at_concurrency_16_are_all_exact(server, engine, images):
    """In-flight batching under load: requests arrive while others decode, with mixed images,
    text-only prompts, drop ratios and lengths; each answer equals its offline run."""
    rng = random.Random(0)
    cases = [(f"USER: <image>\nQuestion {i}? ASSISTANT:" if i % 4 else f"USER: text only {i} ASSISTANT:",
              images[i % 5] if i % 4 else None, 4 + i % 7, [0.0, 0.5, 0.75][i % 3]) for i in range(32)]
    answers, todo, lock = [None] * len(cases), list(range(len(cases))), threading.Lock()

    def worker():
        c = grpcclient.InferenceServerClient(server.grpc_url)
        while True:
            with lock:
                if not todo:
                    break
                i, pause = todo.pop(0), rng.uniform(0, 0.2)
            time.sleep(pause)  # staggered arrivals
            prompt, image, n, drop = cases[i]
            answers[i] = infer(c, "pdrop", request_inputs(prompt, n, image, drop_ratio=drop), request_id=str(i))
        c.close()

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for (prompt, image, n, drop), answer in zip(cases, answers):
        assert answer.error is None, answer.error
        assert answer.ids == offline(engine, prompt, image, max_new_tokens=n, drop_ratio=drop).token_ids
    assert max(a.last["batch_size"].item() for a in answers) > 1  # requests ran together
    last = answers[-1].last
    assert last["kv_blocks_used"].item() >= 0 and last["kv_blocks_free"].item() > 0
    assert last["queue_length"].item() >= 0


def _header_url(width: int, height: int) -> str:
    """A PNG data URL that declares a size and holds no pixels."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _with(inputs: list, *extra) -> list:
    return inputs + list(extra)


def _raw(name: str, array: np.ndarray):
    t = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    t.set_data_from_numpy(array)
    return t


TEXT = "USER: hi ASSISTANT:"
BAD = {
    "missing text_input": ([tensor("max_tokens", np.int32(4))], "text_input"),
    "wrong dtype": ([tensor("text_input", ["hi"]), tensor("max_tokens", np.int64(4))], "INT64"),
    "empty prompt": (request_inputs("   ", 4), "text_input must be one non-empty string"),
    "corrupt image": (request_inputs(PROMPT, 4) + [tensor("image_url_input", ["data:image/png;base64,AAAA"])],
                      "unreadable image"),
    "huge image": (request_inputs(PROMPT, 4) + [tensor("image_url_input", [_header_url(30000, 30000)])],
                   "decompression bomb"),
    "100-megapixel image": (request_inputs(PROMPT, 4) + [tensor("image_url_input", [_header_url(10000, 10000)])],
                            "image is 10000x10000 (100.0 MP)"),
    "remote url": (request_inputs(PROMPT, 4) + [tensor("image_url_input", ["http://127.0.0.1:9/x.png"])],
                   "never fetches"),
    "max_tokens 0": (request_inputs("USER: hi ASSISTANT:", 0), "max_tokens must be a positive"),
    "max_tokens above limit": (request_inputs("USER: hi ASSISTANT:", 5000), "exceeds this engine's max_seq_len"),
    "drop_ratio 1.5": (request_inputs(PROMPT, 4, make_image(60, 90), drop_ratio=1.5), "drop ratio must be in"),
    "too long": (request_inputs("word " * 2000, 4), "max_input_len is 1536"),
    "end_id out of vocabulary": (request_inputs(PROMPT, 4, make_image(60, 90), end_id=10**9, min_tokens=3),
                                 "end_id must be a token id"),
    "negative end_id": (request_inputs(PROMPT, 4, make_image(60, 90), end_id=-5), "end_id must be a token id"),
    "empty image_bytes_input": (request_inputs(PROMPT, 4) + [tensor("image_bytes_input", np.zeros((1, 1, 0, 5, 3),
                                                                                            dtype=np.uint8))],
                                "H, W > 0"),
    "1 MB prompt": (request_inputs("x" * 1_000_000, 4), "prompt is 1000000 bytes"),
    "two image inputs": (_with(request_inputs(PROMPT, 4, make_image(60, 90)),
                               tensor("image_bytes_input", np.zeros((1, 1, 8, 8, 3), dtype=np.uint8))),
                         "send one image input"),
    "two image urls": (_with(request_inputs(PROMPT, 4), _raw("image_url_input", np.array(
        [[b"data:image/png;base64,AAAA", b"data:image/png;base64,AAAA"]], dtype=np.object_))), "one image per request"),
    "image bytes 2-D": (_with(request_inputs(PROMPT, 4), tensor("image_bytes_input", np.zeros((1, 1, 1, 8, 8),
                                                                                             dtype=np.uint8))),
                        "(H, W, 3)"),
    "image bytes 4 channels": (_with(request_inputs(PROMPT, 4),
                                     tensor("image_bytes_input", np.zeros((1, 1, 8, 8, 4), dtype=np.uint8))),
                               "(H, W, 3)"),
    "data url without comma": (_with(request_inputs(PROMPT, 4), tensor("image_url_input", ["data:image/png;base64"])),
                               "malformed data:image URL"),
    "text as image": (_with(request_inputs(PROMPT, 4), tensor("image_url_input", [
        "data:image/png;base64," + base64.b64encode(b"just some text, not a picture").decode()])),
                      "unreadable image"),
    "two prompts": ([_raw("text_input", np.array([[b"a", b"b"]], dtype=np.object_)),
                     tensor("max_tokens", np.int32(4))], "text_input"),
    "prompt not UTF-8": ([_raw("text_input", np.array([[b"\xff\xfe bad"]], dtype=np.object_)),
                          tensor("max_tokens", np.int32(4))], "not valid UTF-8"),
    "image marker, no image": (request_inputs(PROMPT, 4), "no image was given"),
    "two image markers": (request_inputs("<image> and <image>", 4, make_image(60, 90)), "2 <image> markers"),
    "negative temperature": (request_inputs(TEXT, 4, temperature=-1.0), "temperature must be >= 0"),
    "top_p 1.5": (request_inputs(TEXT, 4, top_p=1.5), "top_p must be in (0, 1]"),
    "negative top_k": (request_inputs(TEXT, 4, top_k=-2), "top_k must be >= 0"),
    "negative drop_ratio": (request_inputs(PROMPT, 4, make_image(60, 90), drop_ratio=-0.1), "drop ratio must be in"),
    "NaN drop_ratio": (request_inputs(PROMPT, 4, make_image(60, 90), drop_ratio=float("nan")), "drop ratio"),
    "repetition_penalty 0": (request_inputs(TEXT, 4, repetition_penalty=0.0), "repetition_penalty must be > 0"),
    "beam_width 2": (request_inputs(TEXT, 4, beam_width=2), "beam_width 2 is not supported"),
    "num_return_sequences 3": (request_inputs(TEXT, 4, num_return_sequences=3), "num_return_sequences 3"),
    "top_log_probs 21": (request_inputs(TEXT, 4, return_log_probs=True, top_log_probs=21), "logprobs must be in 0..20"),
    "preprocessed image_input": (_with(request_inputs(PROMPT, 4), tensor("image_input", np.zeros((1, 1, 3, 4, 4),
                                                                                                 dtype=np.float16))),
                                 "preprocessed image_input is not supported"),
    "embedding bias": (_with(request_inputs(TEXT, 4), tensor("embedding_bias_words", ["x"])),
                       "embedding_bias_words is not supported"),
    "unknown input": (_with(request_inputs(TEXT, 4), tensor("lora_task_id", np.uint64(3))), "lora_task_id"),
    "negative max_tokens": (request_inputs(TEXT, -3), "max_tokens must be a positive"),
    "negative min_tokens": (request_inputs(TEXT, 4, min_tokens=-1), "min_tokens must be >= 0"),
    "bad_words not UTF-8": (_with(request_inputs(TEXT, 4), _raw("bad_words", np.array([[b"\xff"]], dtype=np.object_))),
                            "bad_words is not valid UTF-8"),
    "max_tokens twice": ([tensor("text_input", [TEXT]), _raw("max_tokens", np.array([[4, 5]], dtype=np.int32))],
                         "max_tokens"),
}


@pytest.mark.parametrize("case", BAD)
def test_malformed_request_gets_an_error_and_the_server_goes_on(server, client, engine, case):
    inputs, says = BAD[case]
    answer = infer(client, "pdrop", inputs)
    assert answer.error is not None and says in answer.error, answer.error
    assert "Traceback" not in answer.error and "/builder/" not in answer.error  # one line, no paths
    ok = infer(client, "pdrop", request_inputs("USER: hi ASSISTANT:", 3))
    assert ok.error is None and ok.ids == offline(engine, "USER: hi ASSISTANT:", None, max_new_tokens=3).token_ids


def test_unknown_model_and_disconnect(server, client):
    answer = infer(client, "nosuch", request_inputs("USER: hi ASSISTANT:", 3))
    assert answer.error is not None and "nosuch" in answer.error
    # a client that goes away mid-stream: cancel after the first response
    c = grpcclient.InferenceServerClient(server.grpc_url)
    got = threading.Event()
    c.start_stream(callback=lambda result, error: got.set())
    c.async_stream_infer("pdrop", request_inputs(PROMPT, 200, make_image(100, 150)), request_id="gone")
    assert got.wait(60)
    c.stop_stream(cancel_requests=True)
    c.close()
    assert client.is_server_ready() and client.is_model_ready("pdrop")
    assert infer(client, "pdrop", request_inputs("USER: hi ASSISTANT:", 2)).error is None


def test_package_refuses_a_missing_or_corrupt_engine(engine_dir, tmp_path):
    with pytest.raises(EngineError, match="not an engine directory"):
        package_repo(tmp_path / "nothing", tmp_path / "repo")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in engine_dir.iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes())
    (corrupt / "llm.safetensors").write_bytes(b"garbage")
    with pytest.raises(EngineError, match="checksum mismatch"):
        package_repo(corrupt, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def scrape(server) -> dict[tuple[str, tuple], float]:
    """The server's /metrics, parsed by prometheus_client: (sample name, its labels but model and
    version) -> value; model and version are checked to be the served model's."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith(("nv_trt_llm_", "pdrop_")):
                assert (s.labels.pop("model"), s.labels.pop("version")) == ("pdrop", "1"), s
                samples[s.name, tuple(sorted(s.labels.items()))] = s.value
    return samples


def gauge(samples, family, label, value):
    return samples[family, ((label, value),)]


def scrape_while_running(server, images, n: int) -> list[dict]:
    """Scrapes while `n` streams run, until they are seen running together (at most 120 s): each
    asks for more tokens than it can be given time to decode, and is cancelled once seen, so that
    how fast this machine decodes does not decide what the scrapes see."""
    clients = [grpcclient.InferenceServerClient(server.grpc_url) for _ in range(n)]
    running = []
    try:
        for i, c in enumerate(clients):
            c.start_stream(callback=lambda result, error: None)
            c.async_stream_infer("pdrop", request_inputs(PROMPT, 1024, images[i % len(images)], end_id=-1),
                                 request_id=f"long-{i}")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            running.append(scrape(server))
            if gauge(running[-1], "nv_trt_llm_request_metrics", "request_type", "active") >= 2:
                break
            time.sleep(0.2)
    finally:
        for c in clients:
            c.stop_stream(cancel_requests=True)
            c.close()
    deadline = time.monotonic() + 60  # cancelled: gone within a step, their blocks back in the pool
    while time.monotonic() < deadline and gauge(scrape(server), "nv_trt_llm_request_metrics", "request_type",
                                                "active"):
        time.sleep(0.2)
    time.sleep(1.2)  # their last metrics recorded: a refresh (0.5 s) and tritonserver's interval (0.5 s)
    return running


def test_metrics_under_tensorrtllm_backend_names_while_requests_run(server, images):
    """Scraped while 4 streams run, and after 5 more requests: tensorrtllm_backend's request and
    KV-block gauges (the prefix cache's unused blocks count as free), and pdrop's image tokens per
    boundary, time to the first token and prefix cache."""
    running = scrape_while_running(server, images, 4)
    before = scrape(server)
    ttft_count = ("pdrop_time_to_first_token_seconds_count", ())

    def worker(i):
        c = grpcclient.InferenceServerClient(server.grpc_url)
        assert infer(c, "pdrop", request_inputs(PROMPT, 16, images[i % len(images)])).error is None
        c.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    worker(0)  # a second question about an image: a prefix-cache hit
    time.sleep(1.2)  # a refresh (0.5 s) and tritonserver's metrics interval (0.5 s) later
    after = scrape(server)

    assert max(gauge(m, "nv_trt_llm_request_metrics", "request_type", "active") for m in running) >= 2
    assert max(gauge(m, "nv_trt_llm_kv_cache_block_metrics", "kv_cache_block_type", "used") for m in running) > 0
    assert max(gauge(m, "nv_trt_llm_kv_cache_block_metrics", "kv_cache_block_type", "fraction") for m in running) > 0
    for t in ("active", "scheduled", "waiting", "context"):
        assert gauge(after, "nv_trt_llm_request_metrics", "request_type", t) == 0, t
    assert gauge(after, "nv_trt_llm_request_metrics", "request_type", "max") == 8
    blocks = {t: gauge(after, "nv_trt_llm_kv_cache_block_metrics", "kv_cache_block_type", t)
              for t in ("used", "free", "max", "tokens_per", "fraction")}
    assert blocks["used"] == 0 and blocks["free"] == blocks["max"] > 0 and blocks["tokens_per"] == 16
    assert after[ttft_count] - before.get(ttft_count, 0) == 5
    lookups = {r: after["pdrop_prefix_cache_requests_total", (("result", r),)]
               - before.get(("pdrop_prefix_cache_requests_total", (("result", r),)), 0) for r in ("hit", "miss")}
    assert lookups["hit"] >= 1 and sum(lookups.values()) == 5, lookups
    assert after["pdrop_prefix_cache_blocks", ()] > 0 and 0 < after["pdrop_prefix_cache_hit_ratio", ()] < 1
    assert after[("pdrop_time_to_first_token_seconds_sum", ())] > 0
    for layer in ("2", "4", "6"):  # the demo engine's boundaries; drop 0.5 keeps half at each
        new = {state: after[name, labels] - before.get((name, labels), 0)
               for state in ("in", "kept")
               for name, labels in [("pdrop_image_tokens_total", (("layer", layer), ("state", state)))]}
        assert new["in"] > 0 and new["kept"] == pytest.approx(new["in"] / 2, abs=4), (layer, new)


def test_serve_command_starts_and_stops_on_sigterm(repo, tmp_path):
    grpc_port, http_port, openai_port = free_port(), free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "builder", "serve", "--repo", str(repo), "--grpc-port",
                             str(grpc_port), "--http-port", str(http_port), "--metrics-port", "0", "--openai-port",
                             str(openai_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving pdrop on grpc://127.0.0.1:{grpc_port}"), line + proc.stderr.read()
        assert f"OpenAI API http://127.0.0.1:{openai_port}/v1" in line
        models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{openai_port}/v1/models", timeout=10).read())
        assert [m["id"] for m in models["data"]] == ["pdrop"]
        c = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        assert infer(c, "pdrop", request_inputs("USER: hi ASSISTANT:", 2)).error is None
        got = threading.Event()  # a stream cancelled mid-way must not hold the server at exit
        c.start_stream(callback=lambda result, error: got.set())
        c.async_stream_infer("pdrop", request_inputs(PROMPT, 500, make_image(100, 150)), request_id="gone")
        assert got.wait(60)
        c.stop_stream(cancel_requests=True)
        c.close()
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert time.monotonic() - start < 5  # well below tritonserver's exit timeout (10 s): no request was left open
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


# ---- tensorrtllm_backend's own clients, their requests exactly as they send them ------------------
# inflight_batcher_llm/client/end_to_end_grpc_client.py (model "ensemble") and
# tools/multimodal/client.py (its image_bytes_input path, e.g. --model_type llava_onevision), read in
# the tensorrtllm_backend repository before it moved into TensorRT-LLM (triton_backend/).

def e2e_client_inputs(prompt: str, output_len: int, temperature: float) -> list:
    """end_to_end_grpc_client.py's prepare_inputs with its defaults: text_input, max_tokens, stream,
    beam_width, temperature, exclude_input_in_output (False)."""
    input0 = [[prompt]]
    inputs = {"text_input": np.array(input0).astype(object),
              "max_tokens": np.ones_like(input0).astype(np.int32) * output_len,
              "stream": np.array([[False]], dtype=bool), "beam_width": np.array([[1]], dtype=np.int32),
              "temperature": np.array([[temperature]], dtype=np.float32),
              "exclude_input_in_output": np.array([[False]], dtype=bool)}
    return [_raw(k, v) for k, v in inputs.items()]


def multimodal_client_inputs(text: str, image, output_len: int, streaming: bool) -> list:
    """tools/multimodal/client.py's prepare_inputs with its defaults (end_id -1, pad_id 1, top_k 1,
    top_p 0, temperature 1, repetition_penalty 1), the image as image_bytes_input [[pixels]]."""
    arrays = [("text_input", np.array([[text.encode("utf8")]], dtype=np.object_)),
              ("image_bytes_input", np.array([[image]])),
              ("max_tokens", np.array([[output_len]], dtype=np.int32)),
              ("beam_width", np.array([[1]], dtype=np.int32)), ("temperature", np.array([[1.0]], dtype=np.float32)),
              ("end_id", np.array([[-1]], dtype=np.int32)), ("pad_id", np.array([[1]], dtype=np.int32)),
              ("top_k", np.array([[1]], dtype=np.int32)), ("top_p", np.array([[0.0]], dtype=np.float32)),
              ("stream", np.array([[streaming]], dtype=bool)),
              ("repetition_penalty", np.array([[1.0]], dtype=np.float32))]
    return [_raw(k, v) for k, v in arrays]


def stream_as_the_clients_do(url: str, inputs: list) -> list[str]:
    """start_stream, async_stream_infer asking for text_output, stop_stream; then each response's
    output[0].decode(), as both clients print it."""
    import queue

    results: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(url)
    c.start_stream(callback=lambda result, error: results.put((result, error)))
    c.async_stream_infer("pdrop", inputs, outputs=[grpcclient.InferRequestedOutput("text_output")], request_id="")
    c.stop_stream()
    c.close()
    texts = []
    while not results.empty():
        result, error = results.get()
        assert error is None, error
        texts.append(result.as_numpy("text_output")[0].decode("utf-8"))
    return texts


def test_end_to_end_grpc_client_requests_work_unchanged(server, engine):
    prompt = "USER: what is a pyramid? ASSISTANT:"
    [greedy] = stream_as_the_clients_do(server.grpc_url, e2e_client_inputs(prompt, 10, temperature=0.0))
    assert greedy == prompt + offline(engine, prompt, None, max_new_tokens=10).text  # the prompt echoed, as asked
    [sampled] = stream_as_the_clients_do(server.grpc_url, e2e_client_inputs(prompt, 10, temperature=1.0))
    assert sampled.startswith(prompt) and len(sampled) > len(prompt)


def test_multimodal_client_streaming_requests_work_unchanged(server, engine, images):
    image = np.asarray(images[0])
    texts = stream_as_the_clients_do(server.grpc_url, multimodal_client_inputs("What is in it?", image, 16, True))
    # top_k 1 is greedy; end_id -1 means no end token: all 16 tokens come
    expected = engine.generate(["What is in it?"], [image], params=[SamplingParams(16, end_id=-1)])[0]
    assert len(texts) == 16 and "".join(texts) == expected.text


@pytest.fixture(scope="module")
def unary_server(engine_dir, tmp_path_factory):
    repo = package_repo(engine_dir, tmp_path_factory.mktemp("unary") / "models", decoupled=False).parent
    with TritonServer(repo, log_path=tmp_path_factory.mktemp("log") / "triton.log") as s:
        yield s


def test_multimodal_client_unary_requests_work_with_the_non_decoupled_model(unary_server, engine, images):
    """tools/multimodal/client.py without --streaming calls async_infer (ModelInfer), which a
    decoupled model refuses: `package --decoupled false` serves it."""
    import queue

    image = np.asarray(images[1])
    results: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(unary_server.grpc_url)
    c.async_infer("pdrop", multimodal_client_inputs("What is in it?", image, 12, False),
                  lambda result, error: results.put((result, error)),
                  outputs=[grpcclient.InferRequestedOutput("text_output")])
    result, error = results.get(timeout=120)
    assert error is None, error
    expected = engine.generate(["What is in it?"], [image], params=[SamplingParams(12, end_id=-1)])[0]
    assert result.as_numpy("text_output")[0].decode() == expected.text
    # several at once share the engine's steps; a bad one fails alone; streaming is refused by name
    texts = [infer_unary(c, request_inputs(f"USER: hello {i} ASSISTANT:", 5, stream=False)) for i in range(3)]
    assert texts == [offline(engine, f"USER: hello {i} ASSISTANT:", None, max_new_tokens=5).text for i in range(3)]
    with pytest.raises(Exception, match="stream=true needs the decoupled model"):
        infer_unary(c, request_inputs(TEXT, 4, stream=True))
    with pytest.raises(Exception, match="beam_width 2 is not supported"):
        infer_unary(c, request_inputs(TEXT, 4, stream=False, beam_width=2))
    assert infer_unary(c, request_inputs(TEXT, 3, stream=False)) == offline(engine, TEXT, None, max_new_tokens=3).text
    c.close()


def infer_unary(c, inputs) -> str:
    return c.infer("pdrop", inputs).as_numpy("text_output")[0].decode()


def test_arrival_is_stamped_when_the_request_arrives_not_when_it_runs(server, images):
    """A request sent while another prefills waits in the scheduler's queue: its arrival_time_ns is
    when it was sent, its first token comes later."""
    busy = threading.Thread(target=lambda: infer(grpcclient.InferenceServerClient(server.grpc_url), "pdrop",
                                                 request_inputs(PROMPT, 30, images[0])))
    busy.start()
    time.sleep(0.3)
    c = grpcclient.InferenceServerClient(server.grpc_url)
    sent = time.time_ns()
    answer = infer(c, "pdrop", request_inputs(PROMPT, 2, images[2]))
    busy.join(120)
    last = answer.last
    assert answer.error is None
    assert 0 <= last["arrival_time_ns"].item() - sent < 0.5e9
    assert last["first_token_time_ns"].item() > last["arrival_time_ns"].item()
