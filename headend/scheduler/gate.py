"""Per-link admission: how many sessions a link may carry at once, and who goes first.

A serial line or an HDLC bus carries one session at a time, a concentrator N, direct TCP
meters share a global cap. Waiters are served by priority lane (switching > on-demand >
backfill > bulk), first come first served within a lane.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from enum import IntEnum


class Lane(IntEnum):
    SWITCHING = 0
    ON_DEMAND = 1
    BACKFILL = 2
    BULK = 3


class LinkGate:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a link carries at least one session")
        self.capacity = capacity
        self.busy = 0
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @asynccontextmanager
    async def slot(self, lane: Lane = Lane.BULK) -> AsyncIterator[None]:
        if self.busy >= self.capacity or self._waiting:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting, (int(lane), next(self._order), future))
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

    def _release(self) -> None:
        while self._waiting:
            _lane, _n, future = heapq.heappop(self._waiting)
            if not future.done():
                future.set_result(None)  # the slot passes straight to the next waiter
                return
        self.busy -= 1

    @property
    def queued(self) -> int:
        return sum(1 for _l, _n, f in self._waiting if not f.done())
