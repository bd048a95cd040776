"""The step scheduler: requests come and go between steps over one paged KV pool (in-flight batching).

Each step: retire cancelled requests; admit waiting requests, oldest first, while a batch slot and
the blocks for their whole answer are free; advance the oldest prefill by one pyramid stage (the
drop needs the whole prompt at each boundary, so stages are the natural chunks); then one decode
step for every sequence that has a token to feed. A sequence that ends (EOS, stop word, length,
cancel) leaves at once and its blocks go back to the pool.

Policy "static" is the baseline a server without in-flight batching gives: admit only when nothing
runs, prefill everything admitted, decode until all have finished.

Requests are submitted from any thread; `step` runs in one thread at a time (the caller's, or the
scheduler's own after `start`). Events (Delta, or a PdropError for a request that failed) go to the
callback given at submit.

A failure stays with the request it belongs to: an exception in one request's prefill or sampling
(out of memory, say) fails that request, one in a decode step the requests of that step. Only when
the device itself is left unusable (a sticky CUDA error) does every request fail, and the scheduler
then refuses new ones with that one error, said once in the log, until the server is restarted.
"""
from __future__ import annotations

import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
from tokenizers.decoders import DecodeStream

from ..format.config import SCHEDULERS
from ..format.errors import EngineError, InputError, PdropError, first_line
from ..network import flops
from ..network.pyramid import ImageSpan
from .guided import Matcher
from .paged_kv import BlockPool, SequenceKV, blocks_needed, layer_lengths
from .prefix_cache import Entry, Key, PrefixCache
from .sampling import Sampler, SamplingParams, TokenLogprob
from .stop_words import StopWords


@dataclass
class Delta:
    """One streamed event: new text of request `index`; `result` is set on its last event."""
    index: int
    text: str
    token_id: int | None
    result: "Result | None" = None
    logprob: TokenLogprob | None = None  # the token's, when the request asked (SamplingParams.logprobs)


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or stop word), "length" or "cancelled"
    prompt_tokens: int
    image_tokens: int
    stages: list
    timings: dict
    flops: dict
    layout: dict = field(default_factory=dict)  # image-token layout, for keep maps
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked

    def to_dict(self) -> dict:
        out = {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
               "prompt_tokens": self.prompt_tokens, "image_tokens": self.image_tokens,
               "stages": [s.to_dict() for s in self.stages], "timings": self.timings, "flops": self.flops,
               "layout": self.layout}
        if self.logprobs is not None:
            out["logprobs"] = [{"token_id": t.token_id, "logprob": t.logprob, "top": t.top} for t in self.logprobs]
        return out


class Generation:
    """Decoding state of one request: its sampler, its tokens, the text streamed so far, stops.

    Text grows by one token's piece at a time (the tokenizers library's DecodeStream holds back an
    incomplete UTF-8 character), and stop words are matched as the piece arrives (StopWords): a
    token costs time in its own text, not in the answer's length or the stop words' lengths."""

    def __init__(self, tokenizer, params: SamplingParams, eos: set[int], budget: int, device, prompt: list[int],
                 matcher: Matcher | None = None):
        self.tokenizer, self.params, self.eos, self.budget = tokenizer, params, eos, budget
        bad = [tokenizer.encode(w, add_special_tokens=False) for w in params.bad_words]
        self.sampler = Sampler(params, device, eos, bad, prompt, matcher)
        self.stream = DecodeStream(skip_special_tokens=True)
        self.stops = StopWords(params.stop)
        self.ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.sent = 0
        self.finish: str | None = None
        self.text = ""

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        return self.sampler(logits, self.ids)

    def add(self, token: int, logprob: TokenLogprob | None = None) -> str:
        self.ids.append(token)
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        if token in self.eos:
            self.finish = "stop"
        else:
            if self.sampler.matcher is not None and self.sampler.matcher.accept(token):
                self.finish = "stop"  # the grammar is complete: its last token's text still goes out
            self.text += self.stream.step(self.tokenizer.backend_tokenizer, token) or ""
            at = self.stops.feed(self.text[self.stops.fed:])
            if at is not None:
                self.text, self.finish = self.text[:at], "stop"
        if self.finish is None and len(self.ids) >= self.budget:
            self.finish = "length"
        # hold back a possible start of a stop word
        end = len(self.text) if self.finish else len(self.text) - self.stops.pending()
        delta, self.sent = self.text[self.sent:max(end, self.sent)], max(end, self.sent)
        return delta


class Handle:
    """A submitted request: cancel() it from any thread; `done` is set after its last event."""

    def __init__(self, index: int, on_event: Callable, is_cancelled: Callable[[], bool] | None):
        self.index, self.on_event, self._is_cancelled = index, on_event, is_cancelled
        self.cancelled = False
        self.done = threading.Event()

    def cancel(self) -> None:
        self.cancelled = True

    def wants_out(self) -> bool:
        return self.cancelled or (self._is_cancelled is not None and self._is_cancelled())


@dataclass
class Sequence:
    handle: Handle
    req: object  # engine.Request
    blocks: list[int]  # per layer, reserved at admission
    t0: float  # when its preprocessing began
    t_pre: float  # seconds of preprocessing (tokenizing, image tiles)
    kv: SequenceKV | None = None
    prefill: object = None  # model.Prefill while prefilling
    gen: Generation | None = None
    token: torch.Tensor | None = None  # the last sampled token, fed to the next decode step
    layout: dict = field(default_factory=dict)
    vision_s: float = 0.0
    ttft: float = 0.0
    key: Key | None = None  # its prefix-cache key, when it has a prefix to share
    entry: Entry | None = None  # the prefix-cache entry whose blocks it reads
    features: tuple | None = None  # its image's features, while it may still become an entry


class Scheduler:
    def __init__(self, engine, pool: BlockPool, max_batch: int, max_queued: int = 64, policy: str = "inflight",
                 cache: PrefixCache | None = None):
        if policy not in SCHEDULERS:
            raise InputError(f"unknown scheduler '{policy}': choose {', '.join(SCHEDULERS)}")
        self.engine, self.pool, self.policy, self.cache = engine, pool, policy, cache
        self.max_batch, self.max_queued = max_batch, max_queued
        self.waiting: deque[Sequence] = deque()
        self.active: list[Sequence] = []  # admitted: prefilling or decoding, in admission order
        self.lock = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.scheduled = self.context = 0  # of the last step, for metrics
        self.broken: str | None = None  # why the device can run nothing more

    # ---- submission (any thread) ----------------------------------------------------------

    def blocks_for(self, req) -> list[int]:
        cfg = self.engine.manifest.llm
        lengths = layer_lengths(req.schedule, cfg.n_layers, req.prompt_tokens, req.image_tokens)
        return blocks_needed(lengths, self.budget(req), self.pool.block_size)

    def budget(self, req) -> int:
        return min(req.params.max_new_tokens, self.engine.manifest.limits.max_seq_len - req.prompt_tokens)

    def submit(self, req, on_event: Callable, index: int = 0, t0: float | None = None,
               is_cancelled: Callable[[], bool] | None = None) -> Handle:
        """Queue a prepared request; InputError at once when it can never fit or the queue is full,
        EngineError when the device is unusable."""
        blocks = self.blocks_for(req)
        if sum(blocks) > self.pool.num_blocks:
            raise InputError(f"request needs {sum(blocks)} KV blocks ({req.prompt_tokens} prompt tokens + "
                             f"{self.budget(req)} new); the pool has {self.pool.num_blocks}")
        now = time.perf_counter()
        handle = Handle(index, on_event, is_cancelled)
        with self.lock:  # with the lock: the device cannot break between this check and the append
            if self.broken:
                raise EngineError(self.broken)
            if len(self.waiting) >= self.max_queued:
                raise InputError(f"server busy: {len(self.waiting)} requests queued (--max-queued-requests); "
                                 "retry later")
            t0 = now if t0 is None else t0
            key = self.cache.key(req, req.image_key) if self.cache else None
            self.waiting.append(Sequence(handle, req, blocks, t0, now - t0, key=key))
            self.lock.notify()
        return handle

    def stats(self) -> dict[str, int]:
        """queued, running (admitted), kv_blocks_used / _free (the prefix cache's unused blocks are
        free: any admission may evict them); of the last step, the sequences it advanced (scheduled)
        and those of them that were prefilling (context): 0 once idle; the prefix cache's blocks, hits
        and misses."""
        busy, cache = not self.idle(), self.cache
        free = self.pool.n_free + (cache.n_evictable if cache else 0)
        return {"queued": len(self.waiting), "running": len(self.active),
                "kv_blocks_used": self.pool.num_blocks - free, "kv_blocks_free": free,
                "scheduled": self.scheduled * busy, "context": self.context * busy,
                "prefix_cache_blocks": cache.n_blocks if cache else 0,
                "prefix_cache_hits": cache.stats.hits if cache else 0,
                "prefix_cache_misses": cache.stats.misses if cache else 0}

    # ---- the step loop --------------------------------------------------------------------

    def idle(self) -> bool:
        return not self.waiting and not self.active

    def step(self) -> None:
        self.retire_cancelled()
        self.admit()
        prefilling = [s for s in self.active if s.gen is None]
        prefilling = prefilling[:1] if self.policy == "inflight" else prefilling
        self.context = len(prefilling)
        self.scheduled = self.context + sum(s.token is not None for s in self.active)
        for s in prefilling:
            self._prefill(s, whole=self.policy == "static")
        self._decode([s for s in self.active if s.token is not None])

    def retire_cancelled(self) -> None:
        """Requests cancelled since the last step leave; their blocks go back to the pool."""
        with self.lock:
            gone = [s for s in self.waiting if s.handle.wants_out()]
            for s in gone:
                self.waiting.remove(s)
        for s in gone + [s for s in self.active if s.handle.wants_out()]:
            self._finish(s, "cancelled")

    def admit(self) -> int:
        """Admit waiting requests, oldest first, while a batch slot and their blocks are free (unused
        prefix-cache entries are evicted for them); how many."""
        admitted = 0
        with self.lock:
            if self.policy == "static" and self.active:
                return 0
            while self.waiting and len(self.active) < self.max_batch:
                s = self.waiting[0]
                entry = self.cache.get(s.key) if s.key else None
                need = sum(s.blocks) - (entry.n_blocks if entry else 0)
                if entry:
                    entry.users += 1  # not evicted to make room for its own user
                fits = need <= self.pool.n_free or (self.cache and self.cache.evict(need - self.pool.n_free))
                if entry:
                    entry.users -= 1
                if not fits:
                    break
                self.waiting.popleft()
                s.kv = SequenceKV.of(self.pool.allocate(need), s.blocks, entry and entry.blocks,
                                     entry.tokens if entry else 0)
                if entry:  # pinned only once it holds the blocks that read it: a failure before pins nothing
                    self.cache.use(entry)
                s.entry = entry
                self.active.append(s)
                admitted += 1
        return admitted

    def _prefill(self, s: Sequence, whole: bool) -> None:
        engine, req = self.engine, s.req
        try:
            if s.prefill is None:
                self._start_prefill(s)
            while True:
                engine.llm.prefill_stage(s.prefill)
                if s.features is not None and s.prefill.layer == s.key.depth:
                    self._offer(s)
                if s.prefill.done or not whole:
                    break
            if not s.prefill.done:
                return
            p = req.params
            eos = set(engine.manifest.eos_token_ids) if p.end_id is None else {p.end_id} - {-1}
            matcher = engine.grammars.matcher(req.grammar) if req.grammar is not None else None
            s.gen = Generation(engine.tokenizer, p, eos, self.budget(req), engine.device, req.input_ids.tolist(),
                               matcher)
            s.token = s.gen.sample(engine.llm.output(engine.llm.norm(s.prefill.h[:, -1:])[0, -1]))
            s.prefill.h = None  # the prompt's hidden states are in the KV cache now
            engine.sync()
            s.ttft = time.perf_counter() - s.t0
        except PdropError as e:
            self._fail(s, e)
            return
        except Exception as e:
            self._failed([s], e)
            return
        self._emit([s])

    def _start_prefill(self, s: Sequence) -> None:
        """Embed the prompt and start its prefill: after the cached prefix on a prefix-cache hit. An
        entry made since the request was admitted (by the request of the same image prefilled before
        it) still counts: its blocks replace the request's own."""
        engine, req = self.engine, s.req
        if s.key and not s.entry:
            entry = self.cache.get(s.key)
            if entry:  # adopted, then pinned, then the request's: its end releases only what it pinned
                self.pool.release(s.kv.adopt(entry.blocks, entry.tokens))
                self.cache.use(entry)
                s.entry = entry
            else:
                self.cache.missed()
        entry, device = s.entry, engine.device
        tv = time.perf_counter()
        cached = entry.features if entry else self.cache.features(s.key.image) if s.key else None
        features = (cached[0].to(device), cached[1]) if cached else None  # entries keep them in host memory
        if s.key and not entry:
            features = s.features = features or engine.image_features(req)  # for the entry it may become
        embeds, s.layout = engine.embed(req, features)
        engine.sync()
        s.vision_s = time.perf_counter() - tv
        span = ImageSpan.full(req.image_start, req.n_image, engine.device) if req.n_image else None
        if entry:
            hidden = None if entry.hidden is None else entry.hidden.to(device)
            s.prefill = engine.llm.start_prefill(embeds[:, entry.tokens:], s.kv, span, req.schedule, entry.tokens,
                                                 hidden)
        else:
            s.prefill = engine.llm.start_prefill(embeds, s.kv, span, req.schedule)

    def _offer(self, s: Sequence) -> None:
        """A prefill that reached its key's depth: its prefix becomes a prefix-cache entry."""
        s.entry = self.cache.insert(s.key, s.kv, s.features, s.prefill.h)
        s.features = None

    def _decode(self, seqs: list[Sequence]) -> None:
        if not seqs:
            return
        try:
            logits = self.engine.decoder.step(torch.stack([s.token for s in seqs]), [s.kv for s in seqs])
        except Exception as e:
            self._failed(seqs, e)
            return
        sampled = []
        for i, s in enumerate(seqs):
            try:
                s.token = s.gen.sample(logits[i])
                sampled.append(s)
            except Exception as e:
                self._failed([s], e)
        if self.broken or not sampled:
            return
        self._emit(sampled)

    def _emit(self, seqs: list[Sequence]) -> None:
        """The step's tokens to the host in one read, and the log-probabilities of the rows that
        asked in one more; then each request's event."""
        tokens = torch.stack([s.token for s in seqs]).tolist()
        asked = [s for s in seqs if s.gen.logprobs is not None]
        rows = torch.cat([s.gen.sampler.logprobs for s in asked]).tolist() if asked else []
        for s, token in zip(seqs, tokens):
            logprob = None
            if s.gen.logprobs is not None:
                n = 1 + 2 * s.req.params.logprobs
                logprob, rows = TokenLogprob.of(token, rows[:n]), rows[n:]
            text = s.gen.add(token, logprob)
            delta = Delta(s.handle.index, text, token, logprob=logprob)
            if s.gen.finish is None:
                self._notify(s, delta)
            else:
                self._finish(s, s.gen.finish, delta)

    def _finish(self, s: Sequence, reason: str, delta: Delta | None = None) -> None:
        delta = delta or Delta(s.handle.index, "", None)
        delta.result = self._result(s, reason)
        self._end(s, delta)

    def _fail(self, s: Sequence, error: PdropError) -> None:
        self._end(s, error)

    def _failed(self, seqs: list[Sequence], error: Exception) -> None:
        """`seqs`' work raised `error`: they fail, the others go on, unless the device is unusable."""
        broken = self.engine.device_error()
        if broken is not None:
            self._break(broken)
            return
        for s in seqs:
            if s in self.active:
                self._fail(s, PdropError(f"generation failed: {type(error).__name__}: {first_line(error)}"[:500]))

    def _break(self, message: str) -> None:
        """The device can run nothing more: say so once, fail everything, refuse what comes."""
        with self.lock:
            first, self.broken = self.broken is None, message
            waiting, self.waiting = list(self.waiting), deque()
        if first:
            print(f"pdrop: {message}", file=sys.stderr, flush=True)
        for s in waiting + list(self.active):
            self._fail(s, EngineError(message))

    def _end(self, s: Sequence, event) -> None:
        """The request's last event, sent while it still counts as running; then its blocks go back."""
        self._notify(s, event)
        if s in self.active:
            self.active.remove(s)
            self.pool.release(s.kv.block_ids())
            if s.entry:
                self.cache.release(s.entry)
        s.handle.done.set()

    def _notify(self, s: Sequence, event) -> None:
        """Hand an event to the request's callback; a callback that fails (its client is gone) ends
        that request at the next step, never the others."""
        try:
            s.handle.on_event(event)
        except Exception:
            s.handle.cancel()

    def _result(self, s: Sequence, reason: str) -> Result:
        req, gen = s.req, s.gen
        total = time.perf_counter() - s.t0
        ids = gen.ids if gen else []
        decode_s = total - s.ttft if s.ttft else 0.0
        n_text = req.prompt_tokens - req.image_tokens
        return Result(
            text=gen.text if gen else "", token_ids=ids, finish_reason=reason, prompt_tokens=req.prompt_tokens,
            image_tokens=req.image_tokens, stages=s.prefill.stages if s.prefill else [], layout=s.layout,
            timings={"preprocess_s": s.t_pre, "vision_s": s.vision_s,
                     "prefill_s": max(0.0, s.ttft - s.t_pre - s.vision_s) if s.ttft else 0.0,
                     "ttft_s": s.ttft, "decode_s": decode_s, "total_s": total,
                     "decode_tokens_per_s": (len(ids) - 1) / decode_s if len(ids) > 1 and decode_s else 0.0},
            flops=flops.report(self.engine.manifest.llm, req.schedule, req.image_tokens, n_text),
            logprobs=gen.logprobs if gen else None)

    # ---- a thread of its own, for servers ---------------------------------------------------

    def start(self) -> None:
        """Step in a thread of our own from now on (a server's mode): callers only submit and wait."""
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="pdrop-scheduler", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop stepping after the current step; callers step themselves again."""
        with self.lock:
            self.stopping = True
            self.lock.notify()
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def _loop(self) -> None:
        with torch.inference_mode(), self.engine.on_device():
            while True:
                with self.lock:
                    while self.idle() and not self.stopping:
                        self.lock.wait()
                    if self.stopping:  # what is left ends as cancelled: every request gets its last event
                        for s in [*self.waiting, *self.active]:
                            s.handle.cancel()
                if self.stopping:
                    self.retire_cancelled()
                    return
                try:
                    self.step()
                except Exception as e:  # never let one step take the server down: fail what was running
                    self._failed(list(self.active), e)
