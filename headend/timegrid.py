"""The interval grid: boundaries every `step` since the Unix epoch, in UTC.

Interval reads are stamped with the end of their interval, on this grid; everything that
aligns a time to it (the scheduler, VEE, commissioning, boundary reads) uses these.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def floor_to(t: datetime, step: timedelta) -> datetime:
    """The last boundary at or before `t`."""
    return EPOCH + ((t - EPOCH) // step) * step


def ceil_to(t: datetime, step: timedelta) -> datetime:
    """The first boundary at or after `t` (the end of the interval `t` falls in)."""
    return EPOCH - ((EPOCH - t) // step) * step


def nearest_boundary(t: datetime, step: timedelta) -> datetime:
    n = round((t - EPOCH) / step)
    return EPOCH + n * step


def boundary_of(read_at: datetime, step: timedelta, tolerance: timedelta) -> datetime | None:
    """The boundary a read taken at `read_at` stands for, or None if it is too far from any."""
    boundary = nearest_boundary(read_at, step)
    return boundary if abs(read_at - boundary) <= tolerance else None
