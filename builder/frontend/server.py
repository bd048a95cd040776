"""Run the OpenAI-compatible frontend (uvicorn) in a thread beside a Triton server."""
from __future__ import annotations

import threading
import time

import uvicorn

from ..client.grpc import served_engine_dir
from ..format.manifest import read_manifest
from .openai_api import Frontend, body_limit, create_app


class OpenAIServer:
    """`with OpenAIServer(grpc_url, model, host, port):` serves http://host:port/v1 until the block
    ends. Request bodies over `max_body_bytes` get 413 (default: body_limit of the engine's image
    pixel limit)."""

    def __init__(self, grpc_url: str, model: str, host: str, port: int, max_body_bytes: int | None = None):
        import tritonclient.grpc as grpcclient
        from transformers import AutoTokenizer

        with grpcclient.InferenceServerClient(grpc_url) as client:
            engine_dir = served_engine_dir(client, model)
        tokenizer = AutoTokenizer.from_pretrained(engine_dir)  # the checkpoint's chat template with it
        if max_body_bytes is None:
            max_body_bytes = body_limit(read_manifest(engine_dir, verify=False).limits.max_image_pixels)
        app = create_app(Frontend(grpc_url, model, tokenizer), max_body_bytes)
        self.url = f"http://{host}:{port}/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="pdrop-openai", daemon=True)

    def __enter__(self) -> "OpenAIServer":
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"the OpenAI frontend did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join()
