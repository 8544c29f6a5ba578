"""Putting a meter's profile rows at the true interval ends they belong to.

A meter stamps each capture with its own clock. When that clock is off (measured in the same
session against the head-end's), the rows it captured meanwhile carry stamps that are off by
as much; stored as stamped, the value of 10:00 would be billed at 12:00. So rows are placed:

- A row the meter marks "clock invalid" (status bit 0x20), or any row of a meter that marks
  none while its clock is off, is moved back by the offset measured in this session and
  flagged time-adjusted (2.4.128).
- A row is then stored at the grid boundary nearest its true time, never at an off-grid
  time. One that lands more than the plan's clock tolerance from it (a meter two minutes
  fast captured at 10:13 what it called 10:15) cannot be placed exactly: it is stored at that
  boundary flagged clock drift (2.6.16), so validation holds it as suspect, never actual.
- A row that cannot be placed at all (marked clock-invalid with no offset known now, or a
  second value for a boundary already placed in this read) is held in the outbox's
  quarantine with the reason, never stored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from headend.model import CLOCK_INVALID_BIT, Obis, Quality, Reading, meter_status
from headend.timegrid import nearest_boundary


@dataclass
class Placed:
    readings: list[Reading] = field(default_factory=list)
    #: (reading as read, why it could not be placed)
    held: list[tuple[Reading, str]] = field(default_factory=list)
    adjusted: int = 0


def place_on_grid(readings: Sequence[Reading], offset: timedelta | None, step: timedelta,
                  tolerance: timedelta) -> Placed:  # fmt: skip
    """`offset`: how far the meter's clock is ahead of true time, measured in this session,
    or None when it is within tolerance (or was not measured)."""
    out = Placed()
    # A profile's values share few quality tuples and, per row, one time: each is worked out
    # once, not once per value.
    invalid_of: dict[tuple[str, ...], bool] = {}
    boundary_of: dict[datetime, datetime] = {}

    def invalid(r: Reading) -> bool:
        flag = invalid_of.get(r.qualities)
        if flag is None:
            flag = invalid_of[r.qualities] = bool(meter_status(r.qualities) & CLOCK_INVALID_BIT)
        return flag

    marks = any(invalid(r) for r in readings if r.kind == "interval")
    taken: set[tuple[Obis, datetime]] = set()
    # Rows taken as stamped go first: on a collision the row that needed no correction stands.
    for r in sorted(readings, key=invalid):
        if r.kind != "interval":
            out.readings.append(r)
            continue
        shift = invalid(r) if marks else offset is not None
        if shift and offset is None:
            out.held.append((r, "captured while the meter's clock was invalid, and its offset is not known now"))
            continue
        true_t = r.timestamp - offset if offset is not None and shift else r.timestamp
        boundary = boundary_of.get(true_t)
        if boundary is None:
            boundary = boundary_of[true_t] = nearest_boundary(true_t, step)
        if (r.channel, boundary) in taken:
            out.held.append((r, f"a second value for {boundary.isoformat()} (the meter's clock moved)"))
            continue
        taken.add((r.channel, boundary))
        qualities = r.qualities
        if shift and boundary != r.timestamp:
            qualities = (*qualities, Quality.TIME_ADJUSTED)
        if abs(true_t - boundary) > tolerance:
            qualities = (*qualities, Quality.CLOCK_DRIFT)
        if shift:
            out.adjusted += 1
        if boundary != r.timestamp or qualities != r.qualities:
            r = dataclasses.replace(r, timestamp=boundary, qualities=qualities)
        out.readings.append(r)
    return out
