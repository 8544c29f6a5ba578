"""Collection KPIs: how much of a day's interval data each link delivered, whatever its protocol.

Plan reports only see the meters a plan polls; meters behind an MQTT concentrator push their
data and are in no plan. These figures come from the store instead, so every meter counts:
per link (the concentrator, for meters behind one), the share of expected intervals stored
for the last complete day and how many meters were complete, partial or silent.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta

from headend.config import Meter
from headend.registry import Registry
from headend.storage.base import ReadingStore
from headend.timegrid import ceil_to
from headend.vee.energies import IMPORT


@dataclass
class LinkCompleteness:
    expected: int = 0
    received: int = 0
    complete: int = 0
    partial: int = 0
    silent: int = 0

    @property
    def ratio(self) -> float:
        return self.received / self.expected if self.expected else 1.0


def intervals_received(deltas: set[datetime], points: set[datetime], start: datetime, end: datetime,
                       step: timedelta) -> int:  # fmt: skip
    """Intervals in (start, end] with a value: given as interval energies (`deltas`), or as the
    register at both of their ends (`points`, a load profile)."""
    t, known = ceil_to(start + timedelta(microseconds=1), step), 0
    while t <= end:
        known += t in deltas or (t in points and t - step in points)
        t += step
    return known


async def day_completeness(store: ReadingStore, registry: Registry, day: datetime,
                           step: timedelta) -> dict[str, LinkCompleteness]:  # fmt: skip
    """Per link (or concentrator), the day (day, day + 1 d] as stored now: two store requests
    for the whole fleet, not two per meter."""
    end = day + timedelta(days=1)
    meters = registry.meters()
    ids = [m.id for m in meters]
    deltas = await store.interval_times(ids, IMPORT.interval, day, end)
    points = await store.interval_times(ids, IMPORT.register, day - step, end)
    # A fleet's worth of counting: not on the event loop.
    return await asyncio.to_thread(_tally, meters, deltas, points, day, step)


def _tally(meters: list[Meter], deltas: dict[str, set[datetime]], points: dict[str, set[datetime]],
           day: datetime, step: timedelta) -> dict[str, LinkCompleteness]:  # fmt: skip
    end = day + timedelta(days=1)
    expected = round(timedelta(days=1) / step)
    out: dict[str, LinkCompleteness] = defaultdict(LinkCompleteness)
    for meter in meters:
        received = intervals_received(deltas.get(meter.id, set()), points.get(meter.id, set()), day, end, step)
        kpi = out[meter.concentrator or meter.link or ""]
        kpi.expected += expected
        kpi.received += received
        if received == expected:
            kpi.complete += 1
        elif received:
            kpi.partial += 1
        else:
            kpi.silent += 1
    return dict(out)
