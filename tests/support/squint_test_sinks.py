"""A response sink for the LLM worker's loops that records what they send (unit tests)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from squint.errors import SquintError


@dataclass
class RecordingSink:
    """A ResponseSink that records what the loop sends; ``done`` is set by the final call."""

    cancel_after: int | None = None
    tokens: list[int] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    errors: list[SquintError] = field(default_factory=list)
    was_cancelled: bool = False
    cancel_now: bool = False  # the client cancels (set from the test's thread)
    done: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    token_times: list[float] = field(default_factory=list)

    def send_token(self, token_id: int) -> None:
        self.tokens.append(token_id)
        self.token_times.append(time.monotonic())
        self.started.set()

    def finish(self, reason: str) -> None:
        self.finished.append(reason)
        self.done.set()

    def fail(self, error: SquintError) -> None:
        self.errors.append(error)
        self.done.set()

    def cancelled(self) -> None:
        self.was_cancelled = True
        self.done.set()

    def is_cancelled(self) -> bool:
        return self.cancel_now or (self.cancel_after is not None and len(self.tokens) >= self.cancel_after)
