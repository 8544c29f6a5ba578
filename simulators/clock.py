"""Simulated time for simulators and tests: the logic runs on this clock, not on sleeps."""

from __future__ import annotations

import time
from datetime import UTC, datetime


class Clock:
    """Wall-clock time, optionally offset (a meter whose clock drifts)."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def now(self) -> float:
        return time.time() + self.offset

    def datetime(self) -> datetime:
        return datetime.fromtimestamp(self.now(), UTC)


class ManualClock(Clock):
    """Time that moves only when told to."""

    def __init__(self, start: float | datetime) -> None:
        super().__init__()
        self._now = start.timestamp() if isinstance(start, datetime) else float(start)

    def now(self) -> float:
        return self._now + self.offset

    def advance(self, seconds: float) -> None:
        self._now += seconds

    def set(self, t: float | datetime) -> None:
        self._now = t.timestamp() if isinstance(t, datetime) else float(t)
