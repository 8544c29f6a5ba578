"""Interval reads for meters without a load profile (Modbus), from energy registers.

The scheduler reads the cumulative energy register at each interval boundary. A read counts
for a boundary only if it was taken within `tolerance` of it. The interval ending at
boundary b is the difference of the reads at b and at b - step. If either read is missing
(the meter did not answer, or answered too late), that interval is written as *missing*
(`value=None`, quality 2.5.259) and is never smeared over its neighbours: the two boundary
register reads that do exist are stored as register reads, so VEE can later estimate the
missing intervals from them (their sum is known exactly).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from headend.model import Obis, Quality, Reading, exact_difference
from headend.timegrid import boundary_read_of, nearest_boundary


def build_intervals(
    meter: str,
    channel: Obis,
    register_reads: Iterable[Reading],
    start: datetime,
    end: datetime,
    step: timedelta,
    tolerance: timedelta,
    *,
    source: str = "",
) -> list[Reading]:
    """Intervals ending at each boundary in (start, end], from cumulative register reads.

    A register read counts for the boundary at or before it, within `tolerance`; others are
    ignored; for each boundary the first read after it (the closest) is used.
    """
    at: dict[datetime, Reading] = {}
    for r in register_reads:
        if r.value is None:
            continue
        b = boundary_read_of(r.timestamp, step, tolerance)
        if b is not None and (b not in at or r.timestamp < at[b].timestamp):  # the first read after it
            at[b] = r
    out = []
    b = nearest_boundary(start, step) + step
    while b <= end:
        before, after = at.get(b - step), at.get(b)
        if before is not None and after is not None:
            assert before.value is not None and after.value is not None
            out.append(
                Reading(
                    meter=meter,
                    channel=channel,
                    timestamp=b,
                    value=exact_difference(after.value, before.value),
                    unit=after.unit,
                    multiplier=after.multiplier,
                    source=source or after.source,
                )
            )
        else:
            out.append(
                Reading(
                    meter=meter,
                    channel=channel,
                    timestamp=b,
                    value=None,
                    unit=(after or before).unit if (after or before) else "",
                    qualities=(Quality.MISSING,),
                    source=source,
                )
            )
        b += step
    return out
