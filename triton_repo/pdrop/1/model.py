"""Triton Python-backend model serving a pdrop engine, batching in flight (decoupled).

`execute` validates each request, hands it to the engine's scheduler and returns at once; the
scheduler's thread generates every admitted request together, step by step, and sends each
request's responses (one per token when streaming) from there. A bad request gets an error
response; a cancelled one leaves at the next step and still gets its final flag; the server keeps
serving.
"""
import json
import time

import triton_python_backend_utils as pb_utils

from builder import Engine, EngineError, PdropError, check_budget, parse_request, response_tensors

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class _Live:
    """A request being generated: where its responses go and what it has produced so far."""

    def __init__(self, engine, sender, job, request, arrival_ns):
        self.engine, self.sender, self.job, self.request = engine, sender, job, request
        self.arrival_ns, self.first_ns, self.tokens = arrival_ns, 0, 0

    def on_event(self, event):
        """Called by the scheduler's thread with a Delta, or a PdropError for a failed request."""
        if isinstance(event, Exception):
            _fail(self.sender, str(event))
            return
        result = event.result
        if result is not None and result.finish_reason == "cancelled":
            self.sender.send(flags=FINAL)  # the client went away: no more text, but the stream must end
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
        response = pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in outputs.items()])
        self.sender.send(response, flags=FINAL if final else 0)


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _fail(sender, message):
    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
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
        arrival = time.time_ns()
        for request in requests:
            sender = request.get_response_sender()
            try:
                job = parse_request(lambda name: _input(request, name))
                prepared = self.engine.prepare(job.prompt, job.image, job.params, job.drop_ratio)
                check_budget(prepared.prompt_tokens, job.params.max_new_tokens, self.max_seq_len)
                live = _Live(self.engine, sender, job, prepared, arrival)
                self.engine.submit(prepared, live.on_event, is_cancelled=sender.is_cancelled)
            except PdropError as e:
                _fail(sender, str(e))
        return None

    def finalize(self):
        self.engine.stop_serving()  # what is still running ends as cancelled, with its final flag
