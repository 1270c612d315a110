"""Spreading generation across several LLM workers (Triton endpoints), with failover.

gRPC keeps one connection per channel, so several Triton replicas behind one ClusterIP Service
would not share the load: the orchestrator dials each replica itself. A discovery (static, DNS
or Kubernetes EndpointSlices, as for the vision workers) lists the endpoints; each request goes
to the one with the fewest requests streaming from it (ties in turn, in address order). An
endpoint that fails UNAVAILABLE before the request's first token is marked down for a while
(tried last, not never) and the request moves to the next endpoint; once a token has been
passed on, the error goes to the client as it is, since the answer cannot be taken back.

:class:`EndpointPicker` is the policy alone, without transport or asyncio; :class:`LLMWorkers`
runs it over one :class:`~orchestrator.llm_client.TritonLLMClient` per endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Protocol

from orchestrator.discovery import Discovery
from orchestrator.llm_client import LLMRequest, LLMStep
from orchestrator.metrics import OrchestratorMetrics
from squint.errors import UpstreamUnavailable

logger = logging.getLogger(__name__)


class LLMClient(Protocol):
    """One LLM worker's client (:class:`~orchestrator.llm_client.TritonLLMClient`)."""

    def generate(self, request: LLMRequest) -> AsyncIterator[LLMStep]: ...

    async def is_ready(self, timeout: float = 2.0) -> bool: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class EndpointState:
    """One endpoint as the picker sees it, for logs and tests."""

    address: str
    up: bool  # False while it is backed off after a failure
    in_flight: int


class EndpointPicker:
    """Which LLM worker takes the next request: the fewest in flight among the endpoints that are
    up; among equals, the next after the last one chosen in address order (round robin). An
    endpoint marked down is chosen only when every endpoint not yet tried for the request is down.

    Thread-safe: the request path (the event loop) calls :meth:`acquire` and :meth:`release`,
    a discovery thread :meth:`update`. Every method is short and does not block.
    """

    def __init__(self, endpoints: Iterable[str] = (), *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._endpoints: tuple[str, ...] = tuple(sorted(set(endpoints)))
        self._in_flight: dict[str, int] = {}
        self._down_until: dict[str, float] = {}
        self._last: str | None = None

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The endpoints discovery lists now, in address order."""
        return self._endpoints

    def update(self, addresses: Iterable[str]) -> None:
        """Replace the endpoints (from discovery); those that stay keep their state. Requests in
        flight on a removed endpoint still :meth:`release` it."""
        endpoints = tuple(sorted(set(addresses)))
        with self._lock:
            old = set(self._endpoints)
            self._endpoints = endpoints
            for address in old - set(endpoints):
                self._down_until.pop(address, None)
        logger.info("LLM workers: %s", ", ".join(endpoints) or "none")

    def acquire(self, exclude: Collection[str] = ()) -> str | None:
        """Choose an endpoint not in ``exclude`` and count a request in flight on it; None when
        every listed endpoint is excluded (or none is listed)."""
        now = self._clock()
        with self._lock:
            candidates = [a for a in self._endpoints if a not in exclude]
            if not candidates:
                return None
            up = [a for a in candidates if self._down_until.get(a, now) <= now]
            pool = up or candidates  # down ones are tried last, not never
            fewest = min(self._in_flight.get(a, 0) for a in pool)
            tied = [a for a in pool if self._in_flight.get(a, 0) == fewest]
            last = self._last
            chosen = next((a for a in tied if last is not None and a > last), tied[0])
            self._last = chosen
            self._in_flight[chosen] = self._in_flight.get(chosen, 0) + 1
            return chosen

    def release(self, address: str) -> None:
        """A request on ``address`` has ended (however it ended)."""
        with self._lock:
            left = self._in_flight.get(address, 0) - 1
            if left > 0:
                self._in_flight[address] = left
            else:
                self._in_flight.pop(address, None)

    def mark_down(self, address: str, for_seconds: float) -> bool:
        """``address`` failed UNAVAILABLE: try it last for ``for_seconds``. True when it was up."""
        now = self._clock()
        with self._lock:
            if address not in self._endpoints:
                return False
            was_up = self._down_until.get(address, now) <= now
            self._down_until[address] = max(self._down_until.get(address, now), now + for_seconds)
            return was_up

    def mark_up(self, address: str) -> bool:
        """``address`` answered: it is up again, whatever its back-off said. True when it was down."""
        now = self._clock()
        with self._lock:
            until = self._down_until.pop(address, None)
            return until is not None and until > now

    def is_up(self, address: str) -> bool:
        now = self._clock()
        with self._lock:
            return address in self._endpoints and self._down_until.get(address, now) <= now

    @property
    def ready(self) -> bool:
        """At least one endpoint is listed and not backed off."""
        now = self._clock()
        with self._lock:
            return any(self._down_until.get(a, now) <= now for a in self._endpoints)

    def in_flight(self, address: str) -> int:
        with self._lock:
            return self._in_flight.get(address, 0)

    def states(self) -> list[EndpointState]:
        now = self._clock()
        with self._lock:
            return [
                EndpointState(a, self._down_until.get(a, now) <= now, self._in_flight.get(a, 0))
                for a in self._endpoints
            ]


class LLMWorkers:
    """The LLM workers a discovery reports, a client each, and the picker between them.

    ``connect`` builds the client of one endpoint (``host:port``); it is called the first time the
    endpoint is chosen, and the client is closed once discovery no longer lists the endpoint and
    no request streams from it.
    """

    def __init__(
        self,
        discovery: Discovery,
        connect: Callable[[str], LLMClient],
        down_seconds: float,
        metrics: OrchestratorMetrics | None = None,
        *,
        startup_grace_seconds: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.discovery = discovery
        self.picker = EndpointPicker(clock=clock)
        self.metrics = metrics or OrchestratorMetrics()
        self._connect = connect
        self._down_seconds = down_seconds
        self._clients: dict[str, LLMClient] = {}
        self._ever_ready: set[str] = set()  # endpoints that have answered ready at least once
        self._startup_grace = startup_grace_seconds
        self._listed_since: dict[str, float] = {}
        self._said_slow: set[str] = set()  # never ready past the grace, and said so
        self._clock = clock
        self._watch_task: asyncio.Task | None = None

    def start(self) -> None:
        """Begin discovery (its first answer fills the picker before this returns)."""
        self.discovery.start(self._update)

    def _update(self, addresses: list[str]) -> None:
        self.picker.update(addresses)
        for gone in set(self._listed_since) - set(addresses):  # listed again later: its grace starts again
            del self._listed_since[gone]
            self._said_slow.discard(gone)
        for address in addresses:
            self._listed_since.setdefault(address, self._clock())
            self.metrics.llm_up.labels(endpoint=address).set(1 if self.picker.is_up(address) else 0)
            self.metrics.llm_in_flight.labels(endpoint=address).inc(0)  # the series exists from the start

    @property
    def endpoints(self) -> tuple[str, ...]:
        return self.picker.endpoints

    @property
    def ready(self) -> bool:
        """At least one LLM worker is listed and not backed off after a failure."""
        return self.picker.ready

    def client(self, address: str) -> LLMClient:
        if address not in self._clients:
            self._clients[address] = self._connect(address)
        return self._clients[address]

    async def _prune(self) -> None:
        """Close the clients of endpoints discovery dropped, once nothing streams from them."""
        listed = set(self.picker.endpoints)
        for address in [a for a in self._clients if a not in listed and not self.picker.in_flight(a)]:
            await self._clients.pop(address).close()
            self.metrics.forget_llm_worker(address)

    def _mark_down(self, address: str, error: object) -> None:
        """Try ``address`` last for a while. One that has never been ready is still loading its
        models (as at every start, when the orchestrator comes up beside it): said at INFO, and at
        WARNING once it has been listed longer than the start-up grace."""
        if self.picker.mark_down(address, self._down_seconds):
            if address in self._ever_ready:
                logger.warning("LLM worker %s marked down for %.1f s: %s", address, self._down_seconds, error)
            else:
                logger.info("LLM worker %s is not ready yet (%s); tried last until it is", address, error)
        now = self._clock()
        waited = now - self._listed_since.get(address, now)
        if address not in self._ever_ready and address not in self._said_slow and waited >= self._startup_grace:
            self._said_slow.add(address)
            logger.warning(
                "LLM worker %s has not been ready in the %.0f s since it was listed (%s): still loading "
                "its models, or failing to (its log says which)",
                address,
                waited,
                error,
            )
        self.metrics.llm_up.labels(endpoint=address).set(0)

    def _mark_up(self, address: str) -> None:
        first = address not in self._ever_ready
        self._ever_ready.add(address)
        if self.picker.mark_up(address):
            logger.info("LLM worker %s is %s", address, "ready" if first else "up again")
        if address in self.picker.endpoints:
            self.metrics.llm_up.labels(endpoint=address).set(1)

    async def generate(self, request: LLMRequest) -> AsyncIterator[LLMStep]:
        """Stream ``request``'s tokens from one LLM worker, moving to another when one fails
        UNAVAILABLE before anything was passed on; UNAVAILABLE when every worker has failed it."""
        await self._prune()
        failures: list[str] = []
        tried: list[str] = []
        while True:
            address = self.picker.acquire(exclude=tried)
            if address is None:
                detail = "; ".join(failures) or "none is known"
                raise UpstreamUnavailable(f"no LLM worker could take the request: {detail}")
            self.metrics.llm_in_flight.labels(endpoint=address).inc()
            outcome = "error"
            passed_on = False
            try:
                async with contextlib.aclosing(self.client(address).generate(request)) as steps:
                    async for step in steps:
                        if not passed_on:
                            passed_on = True
                            self._mark_up(address)
                        if step.finish_reason:
                            outcome = "ok"  # the caller may close the stream as soon as it has the last step
                        yield step
                outcome = "ok"
                self._mark_up(address)
                return
            except UpstreamUnavailable as exc:
                outcome = "unavailable"
                self._mark_down(address, exc)
                if passed_on:
                    raise  # part of the answer is out: the client sees the error, as with one worker
                tried.append(address)
                failures.append(str(exc))
                self.metrics.llm_failovers.labels(endpoint=address).inc()
                logger.warning(
                    "request %s: LLM worker %s failed before the first token (%s); trying another",
                    request.request_id,
                    address,
                    exc,
                )
            except (GeneratorExit, asyncio.CancelledError):
                if outcome != "ok":
                    outcome = "cancelled"  # ended before the worker finished: a stop string, a client gone
                raise
            finally:
                self.picker.release(address)
                self.metrics.llm_in_flight.labels(endpoint=address).dec()
                self.metrics.llm_requests.labels(endpoint=address, outcome=outcome).inc()

    async def probe(self) -> bool:
        """Ask every listed worker whether it is ready: one that is not is marked down (tried last),
        one that is is up again. Whether any is ready."""
        await self._prune()
        endpoints = self.picker.endpoints
        answers = await asyncio.gather(*(self.client(a).is_ready() for a in endpoints), return_exceptions=True)
        for address, answer in zip(endpoints, answers, strict=True):
            if answer is True:
                self._mark_up(address)
            else:
                self._mark_down(address, f"readiness check: {answer or 'ServerReady is false'}")
        return self.ready

    def watch(self, interval: float, on_change: Callable[[bool], Awaitable[None]]) -> None:
        """Every ``interval`` seconds :meth:`probe` the workers, and await ``on_change(ready)`` when
        whether any is ready changes (and once at first); until :meth:`close`."""

        async def run() -> None:
            last: bool | None = None
            while True:
                try:
                    ready = await self.probe()
                except Exception:  # a failed round must not end the watch
                    logger.exception("LLM workers: the readiness round failed")
                else:
                    if ready != last:
                        if ready or last is not None:
                            logger.log(
                                logging.INFO if ready else logging.WARNING,
                                "LLM workers: %s",
                                "ready" if ready else "none is ready (requests are refused UNAVAILABLE)",
                            )
                        last = ready
                        await on_change(ready)
                await asyncio.sleep(interval)

        self._watch_task = asyncio.create_task(run(), name="squint-llm-workers-watch")

    async def close(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        self.discovery.stop()
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
