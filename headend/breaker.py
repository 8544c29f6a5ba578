"""A circuit breaker (per link in the scheduler, per unit on a Modbus line): a dead
concentrator, line or meter costs a few attempts, then none until the cooldown has passed,
so it never holds up the rest of the fleet."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class CircuitBreaker:
    threshold: int = 3
    cooldown: float = 300.0
    monotonic: Callable[[], float] = time.monotonic
    failures: int = 0
    open_until: float = 0.0
    trips: int = field(default=0)

    @property
    def is_open(self) -> bool:
        return self.failures >= self.threshold and self.monotonic() < self.open_until

    def state(self) -> str:
        if self.is_open:
            return "open"
        return "half-open" if self.failures >= self.threshold else "closed"

    def record(self, ok: bool) -> None:
        if ok:
            self.failures = 0
            return
        self.failures += 1
        if self.failures >= self.threshold:
            self.open_until = self.monotonic() + self.cooldown
            self.trips += 1
