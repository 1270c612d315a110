"""Streaming detokenization with stop strings."""

from __future__ import annotations

from collections.abc import Sequence


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, honouring stop strings.

    Text is released only when it is final: not ending in a partial UTF-8 character, and not
    possibly the start of a stop string. Once a stop string appears the text is cut before it
    and :attr:`stopped` is set.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._emitted = 0  # characters of the text already released
        self.stopped = False

    @property
    def text(self) -> str:
        return self._tokenizer.decode(self._ids, skip_special_tokens=True)

    def push(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the text that became final."""
        if self.stopped:
            return ""
        self._ids.extend(token_ids)
        text = self.text
        for stop in self._stop:
            at = text.find(stop, max(0, self._emitted - len(stop) + 1))
            if at != -1:
                self.stopped = True
                return self._release(text[:at], len(text[:at]))
        end = len(text.rstrip("\ufffd"))  # a trailing U+FFFD is a character still arriving
        hold = max(
            (
                k
                for stop in self._stop
                for k in range(1, min(len(stop) - 1, end) + 1)
                if text[end - k : end] == stop[:k]
            ),
            default=0,
        )  # a suffix that may grow into a stop string
        return self._release(text, end - hold)

    def flush(self) -> str:
        """At the end of generation, release what was held back (no stop string completed)."""
        if self.stopped:
            return ""
        text = self.text
        return self._release(text, len(text))

    def _release(self, text: str, upto: int) -> str:
        if upto <= self._emitted:
            return ""
        delta = text[self._emitted : upto]
        self._emitted = upto
        return delta
