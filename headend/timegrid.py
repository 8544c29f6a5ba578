"""The interval grid: boundaries every `step` since the Unix epoch, in UTC.

Interval reads are stamped with the end of their interval, on this grid; everything that
aligns a time to it (the scheduler, VEE, commissioning, boundary reads) uses these.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TypeVar

import numpy as np

#: An epoch-ns time, or an array of them (the grid in VEE's columns).
Ns = TypeVar("Ns", int, np.ndarray)

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def floor_to(t: datetime, step: timedelta) -> datetime:
    """The last boundary at or before `t`."""
    return EPOCH + ((t - EPOCH) // step) * step


def ceil_to(t: datetime, step: timedelta) -> datetime:
    """The first boundary at or after `t` (the end of the interval `t` falls in)."""
    return EPOCH - ((EPOCH - t) // step) * step


def ceil_ns(t: Ns, step_ns: int) -> Ns:
    """`ceil_to` for epoch nanoseconds (one or an array of them)."""
    return -((-t) // step_ns) * step_ns


def nearest_boundary(t: datetime, step: timedelta) -> datetime:
    n = round((t - EPOCH) / step)
    return EPOCH + n * step


def boundary_of(read_at: datetime, step: timedelta, tolerance: timedelta) -> datetime | None:
    """The boundary a read taken at `read_at` stands for, or None if it is too far from any."""
    boundary = nearest_boundary(read_at, step)
    return boundary if abs(read_at - boundary) <= tolerance else None


def boundaries_ns(t: np.ndarray, step_ns: int, tolerance_ns: int) -> tuple[np.ndarray, np.ndarray]:
    """`boundary_of` for an array of epoch-ns read times: the nearest boundary of each (half-way
    to the even one, as round() does) and whether the read is within `tolerance_ns` of it."""
    n = np.floor_divide(2 * t + step_ns, 2 * step_ns)  # round half up
    half_way = (2 * t) % (2 * step_ns) == step_ns
    n = np.where(half_way & (n % 2 == 1), n - 1, n)
    boundary = n * step_ns
    return boundary, np.abs(t - boundary) <= tolerance_ns


def boundary_read_of(read_at: datetime, step: timedelta, tolerance: timedelta) -> datetime | None:
    """The boundary a register read taken at `read_at` counts for: the last one at or before
    it, if no more than `tolerance` ago. Never the next one: a read at 10:14:30 holds the
    energy up to 10:14:30, not up to 10:15, and taking it for 10:15 would cut that interval short."""
    boundary = floor_to(read_at, step)
    return boundary if read_at - boundary <= tolerance else None
