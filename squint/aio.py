"""Small asyncio helpers the services share."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def gather_or_cancel(*awaitables: Awaitable[T]) -> list[T]:
    """``asyncio.gather``'s results in order; but when one raises, the others are cancelled and
    waited for before the exception goes on (``gather`` leaves them running: the rest of a request
    that has already failed would go on computing, and holding workers, for no one)."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
