"""Per-request sampling parameters and next-token selection: greedy, temperature, top-k, top-p,
repetition / presence / frequency penalties, minimum length and banned words; and the
log-probabilities of the distribution each token was drawn from."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..format.errors import InputError
from .guided import Guide, Matcher

# Per request, for stop strings and for bad words alike: what one request may ask the scheduler's
# thread to match on every token, bounded as a prompt's length is.
MAX_WORDS = 32
MAX_WORD_BYTES = 1000
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the distribution it was drawn from (after
    penalties, bans, temperature, top-k and top-p), and the `top` most likely tokens' (id, logprob)."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]]

    @classmethod
    def of(cls, token_id: int, row: list[float]) -> "TokenLogprob":
        """From a Sampler's row [logprob, k top logprobs, k top ids] as read to the host."""
        k = (len(row) - 1) // 2
        return cls(token_id, row[0], [(int(i), lp) for i, lp in zip(row[1 + k:], row[1:1 + k])])


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    end_id: int | None = None  # replaces the engine's EOS ids for this request; -1: none (TensorRT-LLM's)
    min_tokens: int = 0  # EOS is banned until this many tokens were generated
    bad_words: list[str] = field(default_factory=list)  # never generated (as token sequences)
    # as vLLM and Hugging Face apply them: repetition over the prompt's and the answer's tokens
    # (positive logits divided, negative multiplied), presence and frequency over the answer's
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k most likely
    guide: Guide | None = None  # structured output: a grammar every token must follow (guided.py)

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InputError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("stop", "bad_words"):
            words = getattr(self, name)
            if any(not isinstance(s, str) or not s for s in words):
                raise InputError(f"{name} must be non-empty strings, got {words!r}"[:300])
            if len(words) > MAX_WORDS:
                raise InputError(f"{name}: at most {MAX_WORDS} strings, got {len(words)}")
            longest = max(len(s.encode()) for s in words) if words else 0
            if longest > MAX_WORD_BYTES:
                raise InputError(f"{name}: each at most {MAX_WORD_BYTES} bytes (UTF-8), got one of {longest}")
        if self.min_tokens < 0:
            raise InputError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise InputError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InputError(f"logprobs must be in 0..{MAX_LOGPROBS} (alternatives per token), got {self.logprobs}")


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (vocab,) logits outside the top-k and outside the smallest set of mass >= top_p."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p; the first token always stays
        remove = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(remove.scatter(0, order, remove), -math.inf)
    return logits


def penalize(logits: torch.Tensor, in_prompt: torch.Tensor, counts: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """(vocab,) logits with the request's repetition, presence and frequency penalties applied, over
    the prompt's tokens (in_prompt: (vocab,) bool) and how often the answer holds each (counts: (vocab,))."""
    if p.repetition_penalty != 1.0:
        r = p.repetition_penalty
        logits = torch.where(in_prompt | (counts > 0), torch.where(logits > 0, logits / r, logits * r), logits)
    if p.presence_penalty or p.frequency_penalty:
        cost = torch.where(counts > 0, p.presence_penalty + p.frequency_penalty * counts, 0)
        logits = logits - cost.to(logits.dtype)
    return logits


class Sampler:
    """One per request: its parameters, its own generator, and what it bans and penalizes, as device
    tensors made once: a tensor made from host data in every step would be a host-to-device copy (a
    sync on a GPU) per row per step."""

    def __init__(self, params: SamplingParams, device: torch.device, eos: set[int], bad: list[list[int]],
                 prompt: list[int], matcher: Matcher | None = None):
        self.params, self.prompt, self.matcher = params, prompt, matcher
        self.eos = torch.tensor(sorted(eos), dtype=torch.long, device=device)
        singles = [b[0] for b in bad if len(b) == 1]
        self.banned = [torch.tensor(singles, device=device)] if singles else []  # in every step
        # a longer bad word's last token is banned after its prefix, matched in the host's history
        self.banned_after = [(b[:-1], torch.tensor(b[-1:], device=device)) for b in bad if len(b) > 1]
        # made at the first call, which gives the vocabulary's size; then updated in place
        self.in_prompt: torch.Tensor | None = None  # (vocab,) bool
        self.counts: torch.Tensor | None = None  # (vocab,) how often the history holds each token
        self.counted = 0  # history tokens in `counts`
        # with params.logprobs: the last token's [logprob, top logprobs, top ids], on the device (float64:
        # ids exact), read to the host with the step's tokens
        self.logprobs: torch.Tensor | None = None
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor, history: list[int]) -> torch.Tensor:
        """(vocab,) logits and the tokens generated so far (a list that only grows, call to call)
        -> 0-d next token id tensor."""
        p = self.params
        if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            logits = penalize(logits, *self._tokens(logits, history), p)
        banned = self.banned + [last for prefix, last in self.banned_after if history[-len(prefix):] == prefix]
        if len(history) < p.min_tokens:
            banned.append(self.eos)
        if banned:
            logits = logits.index_fill(0, torch.cat(banned), -math.inf)
        if self.matcher is not None:
            logits = self.matcher.mask(logits)
        if self.generator is None:
            token = logits.argmax()
            self._log(logits, token)
            return token
        scaled = filter_logits(logits.float() / p.temperature, p.top_k, p.top_p)
        token = torch.multinomial(scaled.softmax(-1), 1, generator=self.generator)[0]
        self._log(scaled, token)
        return token

    def _log(self, logits: torch.Tensor, token: torch.Tensor) -> None:
        """The log-probabilities of the (vocab,) `logits` the token was drawn from (in fp32), when asked."""
        k = self.params.logprobs
        if k is None:
            return
        lp = logits.float().log_softmax(-1)
        top = lp.topk(k)
        self.logprobs = torch.cat((lp[token][None], top.values, top.indices.to(lp.dtype))).double()

    def _tokens(self, logits: torch.Tensor, history: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt's token mask and the history's token counts, the new tokens counted in on the
        device by their host ids (an index is a kernel's argument, not a copy)."""
        if self.counts is None:
            vocab, device = logits.shape[0], logits.device
            prompt = torch.tensor(self.prompt, dtype=torch.long, device=device)
            self.in_prompt = torch.zeros(vocab, dtype=torch.bool, device=device).index_fill_(0, prompt, True)
            self.counts = torch.zeros(vocab, dtype=torch.long, device=device)
        for token in history[self.counted:]:
            self.counts[token] += 1
        self.counted = len(history)
        return self.in_prompt, self.counts
