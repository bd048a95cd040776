"""Stop strings found in streamed text in time proportional to the text, whatever their length.

One Knuth-Morris-Pratt automaton per word: its state is the length of the longest prefix of the
word that the text ends with, so each new character costs O(1) amortized per word, where searching
the text again (or every prefix of every word) would cost the word's length per token. The states
also say how much of the text's end could still begin a stop word: the part a stream holds back.
"""
from __future__ import annotations


def failure(word: str) -> list[int]:
    """fail[i]: the length of the longest proper prefix of word[:i + 1] that is also its suffix."""
    fail, k = [0] * len(word), 0
    for i in range(1, len(word)):
        while k and word[i] != word[k]:
            k = fail[k - 1]
        if word[i] == word[k]:
            k += 1
        fail[i] = k
    return fail


class StopWords:
    def __init__(self, words: list[str]):
        self.words = words
        self.fails = [failure(w) for w in words]
        self.states = [0] * len(words)
        self.fed = 0  # characters fed so far

    def feed(self, piece: str) -> int | None:
        """Feed the next piece of text; the position in the whole text where the first stop word to
        complete starts (the longest, where several complete at one character), else None."""
        for c in piece:
            self.fed += 1
            done = None
            for i, (word, fail) in enumerate(zip(self.words, self.fails)):
                k = self.states[i]
                while k and c != word[k]:
                    k = fail[k - 1]
                k += c == word[k]
                if k == len(word):
                    done = max(done or 0, k)
                    k = fail[k - 1]
                self.states[i] = k
            if done is not None:
                return self.fed - done
        return None

    def pending(self) -> int:
        """How many characters at the end of the text fed could begin a stop word."""
        return max(self.states, default=0)
