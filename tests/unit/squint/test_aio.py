"""squint.aio: gather that leaves nothing running once one part has failed."""

from __future__ import annotations

import asyncio

import pytest

from squint.aio import gather_or_cancel


def test_results_come_in_order():
    async def value(v: int, delay: float) -> int:
        await asyncio.sleep(delay)
        return v

    assert asyncio.run(gather_or_cancel(value(1, 0.02), value(2, 0.0), value(3, 0.01))) == [1, 2, 3]


def test_when_one_fails_the_others_are_cancelled_before_the_error_goes_on():
    cancelled = []

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async def failing() -> None:
        await asyncio.sleep(0)
        raise ValueError("bad image")

    async def main():
        with pytest.raises(ValueError, match="bad image"):
            await gather_or_cancel(forever(), failing(), forever())
        return list(cancelled)

    assert asyncio.run(main()) == [True, True]
