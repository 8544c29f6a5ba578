"""Interval data for VEE tests: a smooth, deterministic daily load, as deltas or as a
cumulative register profile, with faults placed by interval index."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from headend.model import IMPORT_ENERGY, IMPORT_INTERVAL, Obis, Reading

T0 = datetime(2026, 3, 2, tzinfo=UTC)  # a Monday
STEP = timedelta(minutes=15)
PER_DAY = 96


def load(k: int, seed: int = 0) -> float:
    """kWh in interval k: 0.3 at night to 0.5 mid-day, a little different per meter."""
    hour = (k % PER_DAY) / 4
    return round(0.3 + 0.2 * math.sin(math.pi * hour / 24) ** 2 + 0.01 * (seed % 7), 6)


def t_of(k: int, start: datetime = T0) -> datetime:
    """End of interval k (interval 0 ends at start + 15 min)."""
    return start + (k + 1) * STEP


Change = Callable[[int, float], float | None] | None  # (interval index, value) -> value to store
Flags = dict[int, tuple[str, ...]] | None  # interval index -> qualities


def _readings(meter: str, channel: Obis, values: list[tuple[int, float]], *, start: datetime, multiplier: float,
              change: Change, qualities: Flags) -> list[Reading]:  # fmt: skip
    """Readings at the ends of intervals k with the given values, `change` applied (None: dropped)."""
    out = []
    for k, raw in values:
        value: float | None = raw * multiplier
        if change is not None:
            value = change(k, value)
        if value is None:
            continue
        out.append(Reading(meter, channel, t_of(k, start), value, unit="kWh", multiplier=multiplier,
                           qualities=(qualities or {}).get(k, ())))  # fmt: skip
    return out


def deltas(meter: str, n: int, *, start: datetime = T0, seed: int = 0, multiplier: float = 1.0,
           change: Change = None, qualities: Flags = None) -> list[Reading]:  # fmt: skip
    return _readings(meter, IMPORT_INTERVAL, [(k, load(k, seed)) for k in range(n)], start=start,
                     multiplier=multiplier, change=change, qualities=qualities)  # fmt: skip


def registers_of(n: int, *, seed: int = 0, base: float = 1000.0) -> list[float]:
    """The register at the end of interval k-1 for k = 0..n (index 0: before the first interval)."""
    values = [base]
    for k in range(n):
        values.append(values[-1] + load(k, seed))
    return values


def cumulative(meter: str, n: int, *, start: datetime = T0, seed: int = 0, multiplier: float = 1.0,
               base: float = 1000.0, change: Change = None, qualities: Flags = None) -> list[Reading]:  # fmt: skip
    """Register readings at interval ends, starting with the one at `start` (k = -1)."""
    values = registers_of(n, seed=seed, base=base)
    return _readings(meter, IMPORT_ENERGY, [(i - 1, v) for i, v in enumerate(values)], start=start,
                     multiplier=multiplier, change=change, qualities=qualities)  # fmt: skip
