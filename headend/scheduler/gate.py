"""Per-link admission: how many sessions a link may carry at once, and who goes first.

A serial line or an HDLC bus carries one session at a time, a concentrator N, direct TCP
meters share a global cap. Waiters are served by lane (switching, then on-demand; backfill and
bulk take turns), first come first served within a lane.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from enum import IntEnum


class Lane(IntEnum):
    SWITCHING = 0
    ON_DEMAND = 1
    BACKFILL = 2
    BULK = 3


#: Lanes served strictly before the others, in this order.
_URGENT = (Lane.SWITCHING, Lane.ON_DEMAND)


class LinkGate:
    """Urgent lanes (switching, then on-demand) go first; backfill (VEE re-reads, gap
    backfills) and bulk take turns while both wait, so re-reads can never starve the plans'
    reads (nor the other way round)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a link carries at least one session")
        self.capacity = capacity
        self.busy = 0
        self._waiting: dict[Lane, deque[asyncio.Future[None]]] = {lane: deque() for lane in Lane}
        self._last_shared = Lane.BULK  # which of backfill and bulk had the last turn

    @asynccontextmanager
    async def slot(self, lane: Lane = Lane.BULK) -> AsyncIterator[None]:
        if self.busy >= self.capacity or any(self._waiting.values()):
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting[lane].append(future)
            try:
                await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():
                    self._release()  # we were handed the slot as we were cancelled
                raise
        else:
            self.busy += 1
        try:
            yield
        finally:
            self._release()

    def _next_lane(self) -> Lane | None:
        for lane in _URGENT:
            if self._waiting[lane]:
                return lane
        backfill, bulk = bool(self._waiting[Lane.BACKFILL]), bool(self._waiting[Lane.BULK])
        if backfill and bulk:
            return Lane.BULK if self._last_shared == Lane.BACKFILL else Lane.BACKFILL
        return Lane.BACKFILL if backfill else Lane.BULK if bulk else None

    def _release(self) -> None:
        while (lane := self._next_lane()) is not None:
            future = self._waiting[lane].popleft()
            if not future.done():
                if lane in (Lane.BACKFILL, Lane.BULK):
                    self._last_shared = lane
                future.set_result(None)  # the slot passes straight to the next waiter
                return
        self.busy -= 1

    @property
    def queued(self) -> int:
        return sum(1 for waiting in self._waiting.values() for f in waiting if not f.done())
