"""Structured output: a grammar constrains every token of an answer, through llguidance (the grammar
engine vLLM and SGLang use). Before each sampling, the request's matcher computes a token bitmask
and the logits of every token the grammar forbids become -inf; the sampled token is fed back to the
matcher, and an answer the grammar completes ends there ("stop").

The mask is computed on the host (the grammar's state lives there) and applied to the row's logits
on the device. A guide is TensorRT-LLM's pair (guided_decoding_guide_type, guided_decoding_guide): "json" (any JSON
value), "json_schema", "regex", "lark" (llguidance's Lark syntax) or "ebnf_grammar" (GBNF). It is
compiled and checked when the request is prepared, so a grammar that cannot compile is refused
before any work.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..format.errors import InputError

KINDS = ("json", "json_schema", "regex", "lark", "ebnf_grammar")


@dataclass(frozen=True)
class Guide:
    kind: str  # one of KINDS
    spec: str = ""  # the schema (JSON text), regex or grammar; unused for "json"


class Grammars:
    """Compiles guides against one tokenizer (the engine's), and makes a matcher per request."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int]):
        import llguidance.hf

        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos_token_ids[0])
        self.compile = lru_cache(maxsize=256)(self._compile)  # clients send the same schema again and again

    def _compile(self, guide: Guide) -> str:
        """The guide as an llguidance grammar; InputError (one line) when it does not compile."""
        from llguidance import LLMatcher, grammar_from

        if guide.kind not in KINDS:
            raise InputError(f"guided decoding type must be one of {', '.join(KINDS)}, got '{guide.kind}'")
        try:
            if guide.kind == "json":
                grammar = LLMatcher.grammar_from_json_schema({"type": "object"},
                                                             defaults={"whitespace_flexible": False})
            elif guide.kind == "json_schema":
                grammar = LLMatcher.grammar_from_json_schema(json.loads(guide.spec),
                                                             defaults={"whitespace_flexible": False})
            elif guide.kind == "regex":
                grammar = LLMatcher.grammar_from_regex(guide.spec)
            else:
                grammar = grammar_from("ebnf" if guide.kind == "ebnf_grammar" else "lark", guide.spec)
            failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        except Exception as e:  # json.loads', the converters' and llguidance's refusals, each its own type
            failed, messages = True, [str(e)]
        if failed:
            detail = " ".join(" ".join(messages).split())[:300] or "invalid"
            raise InputError(f"the {guide.kind} guide does not compile: {detail}")
        return grammar

    def matcher(self, grammar: str) -> "Matcher":
        return Matcher(self.tokenizer, grammar)


class Matcher:
    """One request's place in its grammar."""

    def __init__(self, tokenizer, grammar: str):
        import llguidance

        self.matcher = llguidance.LLMatcher(tokenizer, grammar)
        self.bits = torch.arange(32, dtype=torch.int32)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """(vocab,) logits with every token the grammar forbids next at -inf."""
        words = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.int32)  # 32 tokens a word
        allowed = ((words[:, None] >> self.bits) & 1).flatten()[:logits.shape[0]].bool()
        return logits.masked_fill(~allowed.to(logits.device), -torch.inf)

    def accept(self, token: int) -> bool:
        """Feed the sampled token; True when the grammar is complete (the answer ends)."""
        if not self.matcher.consume_token(token):
            raise InputError(f"guided decoding: token {token} is not allowed here ({self.matcher.get_error()})")
        return self.matcher.is_stopped()
