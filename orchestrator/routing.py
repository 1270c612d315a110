"""Which vision worker gets an image: cache affinity on a consistent-hash ring, with failover.

A vision worker keeps the CLIP features and tokens of the images it has encoded (in its own
memory and in the shared cache), so the same image should go to the same worker. The key is
the image's content hash; the ring maps it to a preference order over every worker: the
first is the owner, the rest the order to fail over in. Walking the ring clockwise means that
when a worker leaves, each of its keys goes to the worker that was next in that key's order,
and nothing else moves; when one joins, it takes only its own share (about 1/N) of the keys.

:class:`WorkerPool` puts the ring together with health: discovery replaces the worker set,
failed calls mark a worker down for a while, and :meth:`WorkerPool.candidates` keeps the ring
order but moves down workers to the end, so they are tried last rather than never.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

DEFAULT_VNODES = 64


def _hash64(data: str) -> int:
    # blake2b, not hash(): the order must be the same in every process and after restarts
    return int.from_bytes(hashlib.blake2b(data.encode("utf-8"), digest_size=8).digest(), "big")


class HashRing:
    """An immutable consistent-hash ring over worker ids (``host:port``).

    Each worker sits at ``vnodes`` points (virtual nodes) so that shares even out; the order
    of the points depends only on the set of workers, not on the order they were given in.
    """

    def __init__(self, workers: Iterable[str], vnodes: int = DEFAULT_VNODES) -> None:
        if vnodes < 1:
            raise ValueError(f"HashRing needs at least 1 virtual node per worker, got {vnodes}")
        self._workers = frozenset(workers)
        self._vnodes = vnodes
        # ties between points (vanishingly rare) are broken by the worker id, so still stable
        points = sorted((_hash64(f"{worker}#{i}"), worker) for worker in self._workers for i in range(vnodes))
        self._hashes = [point for point, _ in points]
        self._owners = [worker for _, worker in points]

    @property
    def workers(self) -> frozenset[str]:
        return self._workers

    @property
    def vnodes(self) -> int:
        return self._vnodes

    def __len__(self) -> int:
        return len(self._workers)

    def __contains__(self, worker: object) -> bool:
        return worker in self._workers

    def owners(self, key: str) -> list[str]:
        """Every worker in this key's preference order: the owner first, then failover order.

        Empty when the ring has no workers.
        """
        total = len(self._workers)
        if total == 0:
            return []
        start = bisect.bisect_right(self._hashes, _hash64(key))
        order: list[str] = []
        seen: set[str] = set()
        n_points = len(self._owners)
        for step in range(n_points):
            worker = self._owners[(start + step) % n_points]
            if worker not in seen:
                seen.add(worker)
                order.append(worker)
                if len(order) == total:
                    break
        return order


@dataclass(frozen=True)
class WorkerState:
    """One worker as the pool sees it, for metrics and logs.

    ``retry_in_seconds`` is how long until a down worker counts as up again (0 when up);
    ``failures`` counts failed calls since its last success.
    """

    address: str
    up: bool
    retry_in_seconds: float
    failures: int


class WorkerPool:
    """The current vision workers, their health, and the order to try them in for an image.

    Thread-safe: the asyncio request path calls :meth:`candidates`, :meth:`mark_down` and
    :meth:`mark_up`, while a discovery thread calls :meth:`update`. Every method is short and
    non-blocking, so it is fine to call from the event loop.
    """

    def __init__(
        self,
        workers: Iterable[str] = (),
        *,
        vnodes: int = DEFAULT_VNODES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._vnodes = vnodes
        self._clock = clock
        self._lock = threading.Lock()
        self._ring = HashRing(workers, vnodes)
        self._down_until: dict[str, float] = {}
        self._failures: dict[str, int] = {}

    @property
    def workers(self) -> frozenset[str]:
        return self._ring.workers

    def __len__(self) -> int:
        return len(self._ring)

    def update(self, addresses: Iterable[str]) -> None:
        """Replace the worker set (from discovery); workers that stay keep their health."""
        ring = HashRing(addresses, self._vnodes)
        with self._lock:
            old = self._ring.workers
            if ring.workers == old:
                return
            self._ring = ring
            for address in old - ring.workers:
                self._down_until.pop(address, None)
                self._failures.pop(address, None)
        logger.info(
            "vision workers: %d (added %s, removed %s)",
            len(ring),
            sorted(ring.workers - old) or "none",
            sorted(old - ring.workers) or "none",
        )

    def mark_down(self, address: str, for_seconds: float) -> None:
        """A call to ``address`` failed: try it last for the next ``for_seconds``.

        Ignored for an address that is no longer in the pool (discovery removed it while the
        call was in flight).
        """
        now = self._clock()
        with self._lock:
            if address not in self._ring:
                return
            was_up = self._down_until.get(address, now) <= now
            self._down_until[address] = max(self._down_until.get(address, now), now + for_seconds)
            failures = self._failures.get(address, 0) + 1
            self._failures[address] = failures
        if was_up:
            logger.warning(
                "vision worker %s marked down for %.1f s (%d failed call(s) in a row)", address, for_seconds, failures
            )

    def mark_up(self, address: str) -> None:
        """A call to ``address`` succeeded: it is healthy again, whatever its interval said."""
        with self._lock:
            was_down = self._down_until.pop(address, None) is not None
            self._failures.pop(address, None)
        if was_down:
            logger.info("vision worker %s is up again", address)

    def candidates(self, content_key: str) -> list[str]:
        """The workers to try for this content, in order: healthy ones in ring order, then down ones.

        The first is the worker most likely to hold the content's features already; a down
        worker whose interval has passed counts as healthy again. Empty when there are no
        workers at all.
        """
        now = self._clock()
        with self._lock:
            ring = self._ring
            down = {address for address, until in self._down_until.items() if until > now}
        order = ring.owners(content_key)
        if not down:
            return order
        return [w for w in order if w not in down] + [w for w in order if w in down]

    def snapshot(self) -> list[WorkerState]:
        """Every worker's state, sorted by address."""
        now = self._clock()
        with self._lock:
            workers = sorted(self._ring.workers)
            down_until = dict(self._down_until)
            failures = dict(self._failures)
        return [
            WorkerState(
                address=address,
                up=down_until.get(address, now) <= now,
                retry_in_seconds=max(0.0, down_until.get(address, now) - now),
                failures=failures.get(address, 0),
            )
            for address in workers
        ]
