"""Per-client admission: how many generation calls one client may have in flight."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from squint.errors import QuotaExceeded


class StreamLimiter:
    """Counts each client's calls in flight and refuses one above ``limit`` (0: no limit).

    Used from the event loop only, so the counts need no lock.
    """

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"limits.max_streams_per_client is {limit}; it must be 0 (no limit) or more")
        self.limit = limit
        self._active: dict[str, int] = {}

    def active(self, client: str) -> int:
        return self._active.get(client, 0)

    @contextlib.contextmanager
    def hold(self, client: str) -> Iterator[None]:
        """One call of ``client`` for the duration of the block, or :class:`QuotaExceeded` at once."""
        active = self.active(client)
        if self.limit and active >= self.limit:
            raise QuotaExceeded(
                f"{client} already has {active} generation calls in flight; the limit is {self.limit} "
                "per client (max_streams_per_client); retry when one finishes"
            )
        self._active[client] = active + 1
        try:
            yield
        finally:
            left = self._active[client] - 1
            if left:
                self._active[client] = left
            else:
                del self._active[client]
