"""VEE on arrival: what the writer stores is checked as it comes.

Before a batch is written, values that would replace a *different* stored value for the
same interval are noted (the store keeps one value per interval; VEE keeps the doubt: the
interval fails the duplicate rule until someone edits it). Only values at or below what is
already stored for their meter and channel can replace anything, so only those are looked
up (one range query per meter and channel); live data, always newer, costs no query. What
is stored is asked once per process, for the whole fleet in one request.

After the batch is stored, the meter-days it touched are noted, and each is validated in the
background once the day has closed (estimates become versions, rule failures are counted),
and again only when a late value touches it: not five weeks of history per batch.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from headend.model import IMPORT_ENERGY, IMPORT_INTERVAL, Obis, Reading
from headend.registry import UnknownMeter
from headend.vee.service import VeeService

log = logging.getLogger(__name__)

WATCHED = (IMPORT_ENERGY, IMPORT_INTERVAL)


DAY = timedelta(days=1)


class ArrivalValidator:
    def __init__(self, vee: VeeService, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.vee = vee
        self.now = now
        #: meter -> rule -> intervals failing it, in the meter's latest validated period
        self.last_flags: dict[str, Counter[str]] = {}
        self.validated = 0
        self.conflicts = 0
        #: Lookups made for values that might replace a stored one (live data makes none).
        self.lookups = 0
        #: meter -> UTC days touched and not validated since
        self._dirty: dict[str, set[datetime]] = {}
        #: (meter, channel) -> the latest interval stored; asked of the store once for the whole
        #: fleet (None: not yet), then kept up to date with what this process writes.
        self._stored_up_to: dict[tuple[str, Obis], datetime] | None = None
        self._wake = asyncio.Event()

    async def _watermarks(self) -> dict[tuple[str, Obis], datetime]:
        if self._stored_up_to is None:
            self.lookups += 1
            self._stored_up_to = await self.vee.store.latest_intervals(WATCHED)
        return self._stored_up_to

    async def before_write(self, batch: Sequence[Reading]) -> None:
        spans: dict[tuple[str, Obis], list[Reading]] = {}
        for r in batch:
            if r.kind == "interval" and r.channel in WATCHED and r.value is not None:
                spans.setdefault((r.meter, r.channel), []).append(r)
        found: list[tuple[str, Obis, datetime, float]] = []
        if not spans:
            return
        watermarks = await self._watermarks()
        for (meter, channel), readings in spans.items():
            newest = max(r.timestamp for r in readings)
            latest = watermarks.get((meter, channel))
            older = [r for r in readings if latest is not None and r.timestamp <= latest]
            watermarks[(meter, channel)] = max(newest, latest) if latest is not None else newest
            if not older:
                continue  # all newer than anything stored: nothing to replace
            self.lookups += 1
            first = min(r.timestamp for r in older)
            last = max(r.timestamp for r in older)
            stored = {s.timestamp: s.value for s in
                      await self.vee.store.query(meter, channel, first - timedelta(microseconds=1), last)}  # fmt: skip
            for r in older:
                old = stored.get(r.timestamp)
                if old is not None and r.value is not None and abs(old - r.value) > 1e-9 * max(1.0, abs(old)):
                    found.append((meter, channel, r.timestamp, old))
        if found:
            log.warning("%d intervals arrived with a value different from the one stored; kept as doubtful",
                        len(found))  # fmt: skip
            self.conflicts += len(found)
            await asyncio.to_thread(self.vee.versions.record_conflicts, found)

    async def after_write(self, batch: Sequence[Reading]) -> None:
        for r in batch:
            if r.kind != "interval" or r.channel not in WATCHED:
                continue
            # An interval ending at midnight belongs to the day before.
            self._dirty.setdefault(r.meter, set()).add(_day_of(r.timestamp))
        if self._dirty:
            self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            waiting = asyncio.ensure_future(self._wake.wait())
            stopping = asyncio.ensure_future(stop.wait())
            now = self.now()
            next_midnight = now.replace(hour=0, minute=0, second=0, microsecond=0) + DAY
            # Woken by new data, or at midnight: the day that closes is validated then.
            await asyncio.wait([waiting, stopping], return_when=asyncio.FIRST_COMPLETED,
                               timeout=(next_midnight - now).total_seconds() + 1)  # fmt: skip
            waiting.cancel()
            stopping.cancel()
            self._wake.clear()
            await self.drain()

    async def drain(self) -> None:
        """Validate every meter-day noted so far whose day has closed; the open day waits."""
        today = _day_of(self.now() + timedelta(microseconds=1))
        for meter in list(self._dirty):
            days = self._dirty[meter]
            closed = sorted(d for d in days if d < today)
            if not closed:
                continue
            days.difference_update(closed)
            if not days:
                del self._dirty[meter]
            for start, end in _spans(closed, self.vee.cfg.max_period):
                try:
                    result = await self.vee.validate(meter, start, end)
                except UnknownMeter:
                    break  # readings of a meter no longer in the registry: nothing to validate against
                except Exception:
                    log.exception("validation on arrival of %s failed", meter)
                    continue
                self.validated += 1
                self.last_flags[meter] = Counter(rule for i in result.intervals for rule in i.rules)

    def failing(self) -> Counter[str]:
        """Intervals failing each rule, over every meter's latest validated period."""
        total: Counter[str] = Counter()
        for flags in self.last_flags.values():
            total.update(flags)
        return total


def _day_of(t: datetime) -> datetime:
    """The UTC day an interval ending at `t` belongs to (one ending at midnight: the day before)."""
    return (t - timedelta(microseconds=1)).replace(hour=0, minute=0, second=0, microsecond=0)


def _spans(days: list[datetime], longest: timedelta) -> list[tuple[datetime, datetime]]:
    """Consecutive days joined into (start, end) periods of at most `longest`."""
    spans: list[tuple[datetime, datetime]] = []
    for day in days:
        if spans and spans[-1][1] == day and day + DAY - spans[-1][0] <= longest:
            spans[-1] = (spans[-1][0], day + DAY)
        else:
            spans.append((day, day + DAY))
    return spans
