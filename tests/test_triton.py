"""A real tritonserver (from nvidia-pytriton) serving the demo engine over gRPC on loopback."""
from __future__ import annotations

import base64
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import make_image

from builder.client.grpc import infer, request_inputs, served_drop_ratio, tensor
from builder.format.errors import EngineError
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


def _bomb_url() -> str:
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
           + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode()


BAD = {
    "missing text_input": ([tensor("max_tokens", np.int32(4))], "text_input"),
    "wrong dtype": ([tensor("text_input", ["hi"]), tensor("max_tokens", np.int64(4))], "INT64"),
    "empty prompt": (request_inputs("   ", 4), "text_input must be one non-empty string"),
    "corrupt image": (request_inputs(PROMPT, 4) + [tensor("image_url_input", ["data:image/png;base64,AAAA"])],
                      "unreadable image"),
    "huge image": (request_inputs(PROMPT, 4) + [tensor("image_url_input", [_bomb_url()])], "unreadable image"),
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
}


@pytest.mark.parametrize("case", BAD)
def test_malformed_request_gets_an_error_and_the_server_goes_on(server, client, engine, case):
    inputs, says = BAD[case]
    answer = infer(client, "pdrop", inputs)
    assert answer.error is not None and says in answer.error
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


def test_serve_command_starts_and_stops_on_sigterm(repo, tmp_path):
    grpc_port, http_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "builder", "serve", "--repo", str(repo), "--grpc-port",
                             str(grpc_port), "--http-port", str(http_port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith(f"serving pdrop on grpc://127.0.0.1:{grpc_port}"), line + proc.stderr.read()
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
        assert time.monotonic() - start < 9  # below tritonserver's exit timeout (10 s): no request was left open
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
