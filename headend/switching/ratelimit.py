"""Per-link pacing of disconnects: a bulk run never floods a line or a concentrator."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class TokenBucket:
    """`rate` operations per `per` seconds, bursts up to `rate`."""

    def __init__(self, rate: int, per: float = 60.0, *, monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:  # fmt: skip
        if rate < 1:
            raise ValueError("rate must be at least 1")
        self.capacity = float(rate)
        self.refill = rate / per
        self.monotonic = monotonic
        self.sleep = sleep
        self.tokens = float(rate)
        self.stamp = monotonic()
        self._lock = asyncio.Lock()

    def take(self) -> float:
        """Take one token if there is one (0.0); else the seconds until there will be, taking nothing."""
        now = self.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.refill)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.refill

    async def acquire(self) -> float:
        """Take one token, waiting for it if need be; return the seconds waited."""
        waited = 0.0
        async with self._lock:
            while (pause := self.take()) > 0:
                waited += pause
                await self.sleep(pause)
            return waited


class LinkLimiter:
    def __init__(self, rate_per_minute: int, **kwargs: object) -> None:
        self.rate = rate_per_minute
        self.kwargs = kwargs
        self._buckets: dict[str, TokenBucket] = {}

    def bucket(self, link: str) -> TokenBucket:
        if link not in self._buckets:
            self._buckets[link] = TokenBucket(self.rate, 60.0, **self.kwargs)  # type: ignore[arg-type]
        return self._buckets[link]

    async def acquire(self, link: str) -> float:
        return await self.bucket(link).acquire()

    def take(self, link: str) -> float:
        """A start on `link` now (0.0), or the seconds to wait for one (nothing taken)."""
        return self.bucket(link).take()
