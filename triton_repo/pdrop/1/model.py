"""Triton Python-backend model serving a pdrop engine, batching in flight.

`execute` validates each request, hands it to the engine's scheduler and, decoupled (the default),
returns at once: the scheduler's thread generates every admitted request together, step by step,
and sends each request's responses (one per token when streaming) from there. Not decoupled (for
unary clients), `execute` waits for the answers of the requests it was given and returns them. A
bad request gets an error response; a cancelled one leaves at the next step and still gets its
final flag; the server keeps serving.

Metrics (when tritonserver runs with --allow-metrics): tensorrtllm_backend's request and KV-cache
block families, under its names and labels, so that dashboards built for it read pdrop unchanged,
refreshed twice a second; and pdrop's own: image tokens into and kept at each pyramid boundary,
the time to the first token, the prefix cache, and the device and precision the engine runs in.
"""
import json
import threading
import time

import triton_python_backend_utils as pb_utils

from builder import (Engine, EngineError, InputError, PdropError, check_budget, instance_device, parse_request,
                     response_tensors)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
TTFT_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0]


class _Metrics:
    """The model's Prometheus metrics, through Triton's custom-metrics API."""

    def __init__(self, engine, model, version):
        self.engine, self.labels = engine, {"model": model, "version": version}
        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        self.families = [
            pb_utils.MetricFamily("nv_trt_llm_request_metrics", "TRT LLM request metrics", gauge),
            pb_utils.MetricFamily("nv_trt_llm_kv_cache_block_metrics", "TRT LLM KV cache block metrics", gauge),
            pb_utils.MetricFamily("pdrop_image_tokens_total",
                                  "image tokens into and kept at each pyramid boundary layer", counter),
            pb_utils.MetricFamily("pdrop_time_to_first_token_seconds", "time to the first token, arrival to response",
                                  pb_utils.MetricFamily.HISTOGRAM),
            pb_utils.MetricFamily("pdrop_prefix_cache_blocks", "KV blocks the prefix cache holds", gauge),
            pb_utils.MetricFamily("pdrop_prefix_cache_requests_total", "requests with a prefix to share, by whether "
                                  "the prefix cache had it", counter),
            pb_utils.MetricFamily("pdrop_prefix_cache_hit_ratio", "hits / requests with a prefix to share", gauge),
            pb_utils.MetricFamily("pdrop_engine_info", "1, labelled with the device and precision the engine runs in",
                                  gauge)]
        requests, blocks, self.image_tokens, ttft, cached, lookups, ratio, info = self.families
        self.info = info.Metric(labels={**self.labels, "device": str(engine.device), "dtype": engine.precision})
        self.info.set(1)
        self.requests = {t: requests.Metric(labels={**self.labels, "request_type": t})
                         for t in ("active", "scheduled", "waiting", "max", "context")}
        self.blocks = {t: blocks.Metric(labels={**self.labels, "kv_cache_block_type": t})
                       for t in ("used", "free", "max", "tokens_per", "fraction")}
        self.per_layer = {}
        self.ttft = ttft.Metric(labels=self.labels, buckets=TTFT_BUCKETS)
        self.cached, self.hit_ratio = cached.Metric(labels=self.labels), ratio.Metric(labels=self.labels)
        self.lookups = {r: lookups.Metric(labels={**self.labels, "result": r}) for r in ("hit", "miss")}
        self.counted = {"hit": 0, "miss": 0}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._refresh_every, args=(0.5,), name="pdrop-metrics", daemon=True)
        self.thread.start()

    def refresh(self):
        engine, stats = self.engine, self.engine.stats()
        total = engine.pool.num_blocks
        values = {"active": stats["running"], "scheduled": stats["scheduled"], "waiting": stats["queued"],
                  "max": engine.manifest.limits.max_batch_size, "context": stats["context"]}
        for name, value in values.items():
            self.requests[name].set(value)
        used = stats["kv_blocks_used"]
        for name, value in {"used": used, "free": stats["kv_blocks_free"], "max": total,
                            "tokens_per": engine.pool.block_size, "fraction": used / total}.items():
            self.blocks[name].set(value)
        self.cached.set(stats["prefix_cache_blocks"])
        for result, key in (("hit", "prefix_cache_hits"), ("miss", "prefix_cache_misses")):
            now = stats[key]  # a counter only grows: add what came since the last refresh
            self.lookups[result].increment(now - self.counted[result])
            self.counted[result] = now
        lookups = sum(self.counted.values())
        self.hit_ratio.set(self.counted["hit"] / lookups if lookups else 0.0)

    def finished(self, result, ttft_s):
        """A request's last result: its boundaries' image tokens and its time to the first token."""
        with self.lock:
            for stage in result.stages:
                for state, n in (("in", stage.tokens_in), ("kept", stage.tokens_kept)):
                    key = (stage.layer, state)
                    if key not in self.per_layer:
                        self.per_layer[key] = self.image_tokens.Metric(
                            labels={**self.labels, "layer": str(stage.layer), "state": state})
                    self.per_layer[key].increment(n)
            if ttft_s is not None:
                self.ttft.observe(ttft_s)
            self.refresh()

    def _refresh_every(self, seconds):
        while not self.stopping.wait(seconds):
            with self.lock:
                self.refresh()

    def close(self):
        self.stopping.set()
        self.thread.join()


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

    def __init__(self, engine, out, job, request, arrival_ns, metrics):
        self.engine, self.out, self.job, self.request, self.metrics = engine, out, job, request, metrics
        self.arrival_ns, self.first_ns, self.tokens = arrival_ns, 0, 0
        self.cum_log_prob = 0.0

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
        if result is not None and self.metrics is not None:
            self.metrics.finished(result, (self.first_ns - self.arrival_ns) / 1e9)
        if event.logprob is not None:
            self.cum_log_prob += event.logprob.logprob
        if self.job.stream:  # one response per token, as tensorrtllm_backend streams
            stages, finish = (result.stages, result.finish_reason) if result else ([], "")
            logprobs = None if event.logprob is None else [event.logprob]
            self._send(event.text, [event.token_id], stages, finish, logprobs, final=result is not None)
        elif result is not None:
            text = result.text if self.job.exclude_input else self.job.prompt + result.text
            self._send(text, result.token_ids, result.stages, result.finish_reason, result.logprobs, final=True)

    def _send(self, text, ids, stages, finish, logprobs, final):
        outputs = response_tensors(text, ids, self.tokens, self.request.prompt_tokens, self.request.image_tokens,
                                   stages, finish, self.engine.stats(),
                                   (self.arrival_ns, self.first_ns, time.time_ns()), logprobs, self.cum_log_prob)
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
        device = instance_device(params.get("device", "auto"), args["model_instance_kind"],
                                 args["model_instance_device_id"])
        self.engine = Engine.load(params["engine_dir"], device=device, dtype=params.get("dtype", "auto"),
                                  kv_cache_tokens=int(params.get("kv_cache_tokens") or 0) or None,
                                  kv_cache_memory_fraction=float(params.get("kv_cache_memory_fraction") or 0) or None,
                                  scheduler=params.get("scheduler", "inflight"),
                                  max_queued_requests=int(params.get("max_queued_requests") or 64),
                                  prefix_cache_tokens=int(params["prefix_cache_tokens"])
                                  if params.get("prefix_cache_tokens", "") != "" else None)
        pb_utils.Logger.log_info(f"pdrop: {params['engine_dir']} runs in {self.engine.precision} on {self.engine.device}")
        self.max_seq_len = self.engine.manifest.limits.max_seq_len
        built = self.engine.manifest.pyramid.drop_ratio
        declared = params.get("drop_ratio")
        if declared is None or float(declared) != built:  # what clients read must be what runs
            raise EngineError(f"config.pbtxt says drop_ratio {declared} but the engine was built with {built}: "
                              "run `python -m builder package` again")
        try:
            self.metrics = _Metrics(self.engine, args["model_name"], args["model_version"])
        except pb_utils.TritonModelException:  # tritonserver without metrics support
            self.metrics = None
        self.engine.start_serving()

    def execute(self, requests):
        arrival = time.time_ns()  # execute never blocks when decoupled: this is when they arrived
        outs = [_Stream(r) if self.decoupled else _Unary(r) for r in requests]
        for request, out in zip(requests, outs):
            try:
                job = parse_request(lambda name: _input(request, name))
                if job.stream and not self.decoupled:
                    raise InputError("stream=true needs the decoupled model: package it with --decoupled true")
                prepared = self.engine.prepare(job.prompt, job.image, job.params, job.drop_ratio, image_id=job.image_id)
                check_budget(prepared.prompt_tokens, job.params.max_new_tokens, self.max_seq_len)
                live = _Live(self.engine, out, job, prepared, arrival, self.metrics)
                self.engine.submit(prepared, live.on_event, is_cancelled=out.is_cancelled)
            except PdropError as e:
                out.send(_error(str(e)))
            except Exception as e:  # a bug: this request fails, with one line, and the batch goes on
                out.send(_error(f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
        if self.decoupled:
            return None
        for out in outs:
            out.done.wait()
        return [out.response for out in outs]

    def finalize(self):
        self.engine.stop_serving()  # what is still running ends as cancelled, with its final flag
        if self.metrics is not None:
            self.metrics.close()
