"""Streaming clients under load for the fault tests: every request accounted for and checked.

A :class:`Load` runs a few client threads against an orchestrator, each sending
``GenerateStream`` requests from a mix of :class:`Case` s one after another until stopped. Every
request sent ends as exactly one :class:`Outcome`, judged against the answer the same request
got on a healthy stack (greedy decoding is deterministic):

- ``ok``       finished, token for token the healthy answer;
- ``refused``  a retryable status (UNAVAILABLE) before any token arrived: the client may retry;
- ``cut``      a retryable status after some tokens, which are a prefix of the healthy answer
               (only a crash of the LLM worker under an open stream may do this);
- ``wrong``    a different answer, or tokens that are no prefix of it: corruption;
- ``error``    any other status (INTERNAL, DEADLINE_EXCEEDED, ...);
- ``lost``     the stream ended with neither a finish reason nor a status.

On pytest's path through ``pythonpath = ["tests/support"]`` in pyproject.toml.
"""

from __future__ import annotations

import io
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import grpc
import numpy as np
from PIL import Image

from bench import load as load_mix
from squint.app.client import build_request
from squint.generate.v1 import generate_pb2 as pb
from squint.generate.v1 import generate_pb2_grpc
from squint.rpc import channel_options

RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)
VERDICTS = ("ok", "refused", "cut", "wrong", "error", "lost")


def seeded_png(seed: int, width: int = 256, height: int = 192) -> bytes:
    pixels = np.random.RandomState(seed).randint(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Case:
    """One request of the mix and, once measured, its answer and cache key on a healthy stack."""

    name: str
    request: pb.GenerateRequest
    expected: tuple[int, ...] = ()
    cache_keys: tuple[str, ...] = ()
    # False: an answer is judged by its length only (a test about something else than the tokens).
    exact: bool = True


# Compressor and parameters per case: the load generator's mix, every built-in.
COMPRESSORS = load_mix.COMPRESSORS


def image_mix(seed: int, max_new_tokens: int = 8) -> list[Case]:
    """One case per compressor: one or two fresh images each (so both vision workers get some)."""
    cases = []
    for n, (compressor, params) in enumerate(COMPRESSORS):
        images = [seeded_png(seed + 10 * n + k, 256 + 32 * k, 192) for k in range(1 + n % 2)]
        request = build_request(
            f"Question {n}: what is in the picture?",
            images,
            compressor=compressor,
            params=params,
            max_new_tokens=max_new_tokens,
        )
        label = compressor + "".join(f",{k}={v}" for k, v in params.items())
        cases.append(Case(f"{label} x{len(images)}", request))
    return cases


def stub_for(address: str) -> tuple[grpc.Channel, generate_pb2_grpc.GenerationServiceStub]:
    channel = grpc.insecure_channel(address, options=channel_options(128 * 1024 * 1024))
    return channel, generate_pb2_grpc.GenerationServiceStub(channel)


def measure(address: str, cases: Sequence[Case], timeout: float = 120.0) -> list[Case]:
    """The cases with the answers a healthy stack gives them, one request at a time."""
    channel, stub = stub_for(address)
    try:
        measured = []
        for case in cases:
            reply = stub.Generate(case.request, timeout=timeout)
            assert reply.finish_reason and reply.token_ids, f"{case.name}: no answer on the healthy stack"
            measured.append(
                replace(case, expected=tuple(reply.token_ids), cache_keys=tuple(m.cache_key for m in reply.usage.media))
            )
        return measured
    finally:
        channel.close()


@dataclass
class Outcome:
    """What became of one request."""

    case: Case
    client: int
    sent: float  # time.monotonic()
    ended: float = 0.0
    first_token: float | None = None
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    status: grpc.StatusCode | None = None  # None: the stream ended without an error status
    details: str = ""
    cache_hits: tuple[bool, ...] = ()  # per image, from the final message's usage
    workers: tuple[str, ...] = ()  # the vision worker of each image

    @property
    def verdict(self) -> str:
        tokens, expected = tuple(self.token_ids), self.case.expected
        if self.status is None:
            if not self.finish_reason:
                return "lost"
            if not self.case.exact:
                return "ok" if len(tokens) == len(expected) else "wrong"
            return "ok" if tokens == expected else "wrong"
        if self.status in RETRYABLE:
            if not tokens:
                return "refused"
            return "cut" if expected[: len(tokens)] == tokens else "wrong"
        return "error"

    def __str__(self) -> str:
        status = self.status.name if self.status else f"finished {self.finish_reason!r}"
        return (
            f"{self.verdict}: {self.case.name} (client {self.client}, sent {self.sent:.2f}, ended {self.ended:.2f}) "
            f"{status} {self.details!r}, {len(self.token_ids)} of {len(self.case.expected)} tokens"
        )


class Load:
    """``clients`` threads streaming requests from ``cases`` to ``address`` until :meth:`stop`.

    Use as a context manager; :attr:`outcomes` holds every ended request, :attr:`sent` counts
    every request sent. ``request_timeout`` is generous: a request that reaches it is an error.
    A client pauses ``retry_pause`` seconds after a failed request, as one retrying would.
    """

    def __init__(
        self,
        address: str,
        cases: Sequence[Case],
        clients: int = 4,
        request_timeout: float = 120.0,
        retry_pause: float = 0.2,
    ) -> None:
        assert all(case.expected for case in cases), "measure() the cases on a healthy stack first"
        self.address = address
        self.cases = list(cases)
        self.clients = clients
        self.request_timeout = request_timeout
        self.retry_pause = retry_pause
        self.sent = 0
        self.outcomes: list[Outcome] = []
        self._open: dict[int, Outcome] = {}
        self._lock = threading.RLock()  # wait_for predicates may call streaming()
        self._changed = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._channel, self._stub = stub_for(address)

    def __enter__(self) -> Load:
        for client in range(self.clients):
            thread = threading.Thread(target=self._client, args=(client,), name=f"load-client-{client}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _client(self, client: int) -> None:
        # Each client walks the mix from its own offset, so the cases run concurrently in turns.
        for n in itertools.count(client):
            if self._stopping.is_set():
                return
            case = self.cases[n % len(self.cases)]
            with self._lock:
                self.sent += 1
                outcome = Outcome(case, client, time.monotonic())
                self._open[id(outcome)] = outcome
            try:
                for message in self._stub.GenerateStream(case.request, timeout=self.request_timeout):
                    if message.token_ids and outcome.first_token is None:
                        outcome.first_token = time.monotonic()
                    outcome.token_ids.extend(message.token_ids)
                    if message.finish_reason:
                        outcome.finish_reason = message.finish_reason
                        outcome.cache_hits = tuple(m.cache_hit for m in message.usage.media)
                        outcome.workers = tuple(m.worker for m in message.usage.media)
            except grpc.RpcError as exc:
                outcome.status, outcome.details = exc.code(), exc.details() or ""
            finally:
                outcome.ended = time.monotonic()
                with self._changed:
                    del self._open[id(outcome)]
                    self.outcomes.append(outcome)
                    self._changed.notify_all()
            if outcome.status is not None:
                self._stopping.wait(self.retry_pause)  # as a client retrying would

    def streaming(self) -> int:
        """How many requests have had tokens and are not finished yet."""
        with self._lock:
            return sum(1 for o in self._open.values() if o.first_token is not None)

    def wait_for(self, predicate: Callable[[list[Outcome]], bool], timeout: float, what: str) -> None:
        """Block until ``predicate(outcomes)`` holds; fail naming ``what`` after ``timeout`` seconds,
        or at once when a request was answered wrong, failed with a non-retryable status, or lost."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(list(self.outcomes)):
                never = [str(o) for o in self.outcomes if o.verdict in ("wrong", "error", "lost")]
                assert not never, f"while waiting for {what}; {self.summary()}:\n" + "\n".join(never[:10])
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; {self.summary()}")
                self._changed.wait(min(left, 0.5))

    def wait_until_ended(self, after: float, count: int, timeout: float, what: str) -> None:
        """Block until ``count`` more requests sent after ``after`` have ended."""
        self.wait_for(lambda outcomes: sum(o.sent > after for o in outcomes) >= count, timeout, what)

    def stop(self, timeout: float | None = None) -> None:
        """Stop sending, and wait for the requests in flight (each ends by its own deadline)."""
        self._stopping.set()
        for thread in self._threads:
            thread.join(self.request_timeout + 30 if timeout is None else timeout)
        self._channel.close()

    @property
    def lost(self) -> int:
        """Requests sent that have no outcome, plus streams that ended with neither answer nor status."""
        with self._lock:
            return self.sent - len(self.outcomes) + sum(o.verdict == "lost" for o in self.outcomes)

    def verdicts(self, outcomes: Sequence[Outcome] | None = None) -> Counter:
        return Counter(o.verdict for o in (self.outcomes if outcomes is None else outcomes))

    def summary(self) -> str:
        with self._lock:
            counts = Counter(o.verdict for o in self.outcomes)
            return f"sent {self.sent}, ended {len(self.outcomes)}: " + ", ".join(
                f"{v} {counts[v]}" for v in VERDICTS if counts[v]
            )


def assert_accounted(load: Load, allowed: Sequence[str], outcomes: Sequence[Outcome] | None = None) -> None:
    """Every request sent has ended, and each ``outcomes`` (default: all) has an allowed verdict."""
    assert load.lost == 0, f"{load.lost} requests lost; {load.summary()}"
    chosen = load.outcomes if outcomes is None else outcomes
    bad = [str(o) for o in chosen if o.verdict not in allowed]
    assert not bad, f"{len(bad)} requests neither {' nor '.join(allowed)}; {load.summary()}:\n" + "\n".join(bad[:20])
