"""Stop words: found as text streams in, in time proportional to the text (StopWords, against a
brute-force search), bounded per request, and a request with the largest stop words allowed does
not slow another one down."""
from __future__ import annotations

import random
import time

import pytest

from builder.format.errors import InputError
from builder.runtime.sampling import MAX_WORD_BYTES, MAX_WORDS, SamplingParams
from builder.runtime.stop_words import StopWords


def brute_force(text: str, words: list[str], fed: int) -> tuple[int | None, int]:
    """Where the first stop word to complete after the first `fed` characters starts (the longest
    of those completing at one character), and the longest end of text that begins a word."""
    for end in range(fed + 1, len(text) + 1):
        starts = [end - len(w) for w in words if text[:end].endswith(w)]
        if starts:
            return min(starts), 0
    return None, max((k for w in words for k in range(1, len(w)) if text.endswith(w[:k])), default=0)


def test_stop_words_match_a_brute_force_search_piece_by_piece():
    rng = random.Random(0)
    for _ in range(300):
        words = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        stops, text = StopWords(words), ""
        while len(text) < 40:
            piece = "".join(rng.choice("abc") for _ in range(rng.randint(0, 4)))
            fed, text = len(text), text + piece
            want_at, want_pending = brute_force(text, words, fed)
            assert stops.feed(piece) == want_at, (words, text)
            if want_at is not None:
                break
            assert stops.pending() == want_pending, (words, text)


def test_stop_and_bad_words_are_bounded_in_one_line():
    SamplingParams(stop=["x" * MAX_WORD_BYTES] * MAX_WORDS, bad_words=["y"] * MAX_WORDS).validate()
    for field, words, message in (("stop", ["s"] * (MAX_WORDS + 1), f"at most {MAX_WORDS} strings"),
                                  ("bad_words", ["é" * (MAX_WORD_BYTES // 2 + 1)], f"at most {MAX_WORD_BYTES} bytes")):
        with pytest.raises(InputError, match=message) as e:
            SamplingParams(**{field: words}).validate()
        assert "\n" not in str(e.value) and len(str(e.value)) < 200


def test_the_largest_stop_words_allowed_do_not_stall_a_small_request(engine):
    """Two requests decoding side by side: the small one takes at most twice as long when the other
    carries MAX_WORDS stop and bad words of MAX_WORD_BYTES each as when it carries none (best of
    three each way: the same batch, so only the words' cost differs, whatever the machine's speed)."""
    rng = random.Random(1)
    words = ["".join(rng.choice("abcdefgh ") for _ in range(MAX_WORD_BYTES)) for _ in range(MAX_WORDS)]
    big = SamplingParams(24, stop=words, bad_words=words[:MAX_WORDS], end_id=-1)
    small = SamplingParams(24, end_id=-1)
    prompts = ["USER: count to ten ASSISTANT:", "USER: name a colour ASSISTANT:"]

    def small_done(params: list[SamplingParams]) -> float:
        t0, done = time.perf_counter(), None
        for d in engine.stream(prompts[:len(params)], params=params):
            if d.index == 0 and d.result is not None:
                done = time.perf_counter() - t0
        return done

    plain = min(small_done([small, SamplingParams(24, end_id=-1)]) for _ in range(3))
    beside = min(small_done([small, big]) for _ in range(3))
    print(f"small request beside no stop words {plain * 1e3:.0f} ms, beside the largest {beside * 1e3:.0f} ms")
    assert beside <= 2 * plain, (plain, beside)
