"""Collection KPIs: how much of a day's interval data each link delivered, whatever its protocol.

Plan reports only see the meters a plan polls; meters behind an MQTT concentrator push their
data and are in no plan. These figures come from the store instead, so every meter counts:
per link (the concentrator, for meters behind one), the share of expected intervals stored
for the last complete day and how many meters were complete, partial or silent.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta

from headend.model import Reading
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


def intervals_received(readings: list[Reading], start: datetime, end: datetime, step: timedelta) -> int:
    """Intervals in (start, end] with a value: given as interval energies, or as the register
    at both of their ends (a load profile)."""
    deltas = {r.timestamp for r in readings if r.channel == IMPORT.interval and r.value is not None}
    points = {r.timestamp for r in readings if r.channel == IMPORT.register and r.value is not None}
    t, known = ceil_to(start + timedelta(microseconds=1), step), 0
    while t <= end:
        known += t in deltas or (t in points and t - step in points)
        t += step
    return known


async def day_completeness(store: ReadingStore, registry: Registry, day: datetime,
                           step: timedelta) -> dict[str, LinkCompleteness]:  # fmt: skip
    """Per link (or concentrator), the day (day, day + 1 d] as stored now."""
    end = day + timedelta(days=1)
    expected = round(timedelta(days=1) / step)
    out: dict[str, LinkCompleteness] = defaultdict(LinkCompleteness)
    for meter in registry.meters():
        readings = [*await store.query(meter.id, IMPORT.interval, day, end),
                    *await store.query(meter.id, IMPORT.register, day - step, end)]  # fmt: skip
        received = intervals_received(readings, day, end, step)
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
