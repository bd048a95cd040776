"""Triton Python-backend model serving a pdrop engine, batching in flight.

`execute` validates each request, hands it to the engine's scheduler and, decoupled (the default),
returns at once: the scheduler's thread generates every admitted request together, step by step,
and sends each request's responses (one per token when streaming) from there. Not decoupled (for
unary clients), `execute` waits for the answers of the requests it was given and returns them. A
bad request gets an error response; a cancelled one leaves at the next step and still gets its
final flag; the server keeps serving.
"""
import json
import threading
import time

import triton_python_backend_utils as pb_utils

from builder import Engine, EngineError, InputError, PdropError, check_budget, parse_request, response_tensors

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class _Stream:
    """Where a decoupled request's responses go: its response sender, as they come."""

    def __init__(self, request):
        self.sender = request.get_response_sender()
        self.is_cancelled = self.sender.is_cancelled

    def send(self, response=None, final=True):
        self.sender.send(response, flags=FINAL if final else 0)


class _Unary:
    """A unary request's one response, kept for execute to return."""

    def __init__(self, request):
        self.is_cancelled = request.is_cancelled
        self.response = None
        self.done = threading.Event()

    def send(self, response=None, final=True):
        if final:  # a cancelled request's final flag comes without a response
            self.response = response or _error("cancelled")
            self.done.set()


class _Live:
    """A request being generated: where its responses go and what it has produced so far."""

    def __init__(self, engine, out, job, request, arrival_ns):
        self.engine, self.out, self.job, self.request = engine, out, job, request
        self.arrival_ns, self.first_ns, self.tokens = arrival_ns, 0, 0

    def on_event(self, event):
        """Called by the scheduler's thread with a Delta, or a PdropError for a failed request."""
        if isinstance(event, Exception):
            self.out.send(_error(str(event)))
            return
        result = event.result
        if result is not None and result.finish_reason == "cancelled":
            self.out.send()  # the client went away: no more text, but the stream must end
            return
        self.tokens += 1
        self.first_ns = self.first_ns or time.time_ns()
        if self.job.stream:  # one response per token, as tensorrtllm_backend streams
            stages, finish = (result.stages, result.finish_reason) if result else ([], "")
            self._send(event.text, [event.token_id], stages, finish, final=result is not None)
        elif result is not None:
            text = result.text if self.job.exclude_input else self.job.prompt + result.text
            self._send(text, result.token_ids, result.stages, result.finish_reason, final=True)

    def _send(self, text, ids, stages, finish, final):
        outputs = response_tensors(text, ids, self.tokens, self.request.prompt_tokens, self.request.image_tokens,
                                   stages, finish, self.engine.stats(),
                                   (self.arrival_ns, self.first_ns, time.time_ns()))
        self.out.send(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in outputs.items()]), final)


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _error(message):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.engine = Engine.load(params["engine_dir"], device=params.get("device", "auto"),
                                  kv_cache_tokens=int(params.get("kv_cache_tokens") or 0) or None,
                                  kv_cache_memory_fraction=float(params.get("kv_cache_memory_fraction") or 0) or None,
                                  scheduler=params.get("scheduler", "inflight"),
                                  max_queued_requests=int(params.get("max_queued_requests") or 64))
        self.max_seq_len = self.engine.manifest.limits.max_seq_len
        built = self.engine.manifest.pyramid.drop_ratio
        declared = params.get("drop_ratio")
        if declared is None or float(declared) != built:  # what clients read must be what runs
            raise EngineError(f"config.pbtxt says drop_ratio {declared} but the engine was built with {built}: "
                              "run `python -m builder package` again")
        self.engine.start_serving()

    def execute(self, requests):
        arrival = time.time_ns()  # execute never blocks when decoupled: this is when they arrived
        outs = [_Stream(r) if self.decoupled else _Unary(r) for r in requests]
        for request, out in zip(requests, outs):
            try:
                job = parse_request(lambda name: _input(request, name))
                if job.stream and not self.decoupled:
                    raise InputError("stream=true needs the decoupled model: package it with --decoupled true")
                prepared = self.engine.prepare(job.prompt, job.image, job.params, job.drop_ratio)
                check_budget(prepared.prompt_tokens, job.params.max_new_tokens, self.max_seq_len)
                live = _Live(self.engine, out, job, prepared, arrival)
                self.engine.submit(prepared, live.on_event, is_cancelled=out.is_cancelled)
            except PdropError as e:
                out.send(_error(str(e)))
        if self.decoupled:
            return None
        for out in outs:
            out.done.wait()
        return [out.response for out in outs]

    def finalize(self):
        self.engine.stop_serving()  # what is still running ends as cancelled, with its final flag
