"""Triton Python-backend model serving a pdrop engine (decoupled: streams one response per token).

Requests that arrive together (dynamic batching) are validated one by one, then generated in one
engine call: each prompt is prefilled on its own, all decode together. A bad request gets an
error response; the others go on, and the server keeps serving.
"""
import json
import time

import triton_python_backend_utils as pb_utils

from builder import Engine, EngineError, PdropError, check_budget, parse_request, response_tensors

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class _Live:
    """A request being generated: where its responses go and what it has produced so far."""

    def __init__(self, sender, job, request):
        self.sender, self.job, self.request = sender, job, request
        self.batch = 1
        self.tokens, self.first_ns, self.done = 0, 0, False

    def send(self, text, ids, stages, finish, arrival, final):
        outputs = response_tensors(text, ids, self.tokens, self.request.prompt_tokens, self.request.image_tokens,
                                   stages, finish, self.batch, (arrival, self.first_ns, time.time_ns()))
        response = pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in outputs.items()])
        self.sender.send(response, flags=FINAL if final else 0)
        self.done = final


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _fail(sender, message):
    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.engine = Engine.load(params["engine_dir"], device=params.get("device", "auto"))
        self.max_seq_len = self.engine.manifest.limits.max_seq_len
        built = self.engine.manifest.pyramid.drop_ratio
        declared = params.get("drop_ratio")
        if declared is None or float(declared) != built:  # what clients read must be what runs
            raise EngineError(f"config.pbtxt says drop_ratio {declared} but the engine was built with {built}: "
                              "run `python -m builder package` again")

    def execute(self, requests):
        arrival, t0 = time.time_ns(), time.perf_counter()
        live = []
        for request in requests:
            sender = request.get_response_sender()
            try:
                job = parse_request(lambda name: _input(request, name))
                prepared = self.engine.prepare(job.prompt, job.image, job.params, job.drop_ratio)
                check_budget(prepared.prompt_tokens, job.params.max_new_tokens, self.max_seq_len)
            except PdropError as e:
                _fail(sender, str(e))
                continue
            live.append(_Live(sender, job, prepared))
        if live:
            try:
                self._generate(live, arrival, t0)
            except Exception as e:  # never let one batch take the server down
                pb_utils.Logger.log_error(f"pdrop: generation failed: {e!r}")
                for item in live:
                    if not item.done:
                        _fail(item.sender, f"generation failed: {e}")
        return None

    def _generate(self, live, arrival, t0):
        for item in live:
            item.batch = len(live)
        stream = self.engine.stream_prepared([item.request for item in live], t0)
        for delta in stream:
            item = live[delta.index]
            if item.done:
                continue
            if item.sender.is_cancelled():  # the client went away: stop answering it
                item.done = True
                if all(i.done for i in live):
                    stream.close()
                    return
                continue
            item.tokens += 1
            item.first_ns = item.first_ns or time.time_ns()
            result = delta.result
            if item.job.stream:  # one response per token, as tensorrtllm_backend streams
                stages, finish = (result.stages, result.finish_reason) if result else ([], "")
                item.send(delta.text, [delta.token_id], stages, finish, arrival, final=result is not None)
            elif result is not None:
                text = result.text if item.job.exclude_input else item.job.prompt + result.text
                item.send(text, result.token_ids, result.stages, result.finish_reason, arrival, final=True)
