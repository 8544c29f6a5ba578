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
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta

from headend.model import IMPORT_ENERGY, IMPORT_INTERVAL, Obis
from headend.registry import UnknownMeter
from headend.storage.base import ReadingStore
from headend.storage.codec import from_ns, to_ns
from headend.storage.series import Series
from headend.vee.service import VeeService
from headend.vee.store import VeeStore

log = logging.getLogger(__name__)

WATCHED = (IMPORT_ENERGY, IMPORT_INTERVAL)


DAY = timedelta(days=1)
NS_PER_DAY = 86_400 * 10**9


class ConflictCheck:
    """The before-write half: notes values that would replace a different stored value. It
    needs only the store and the versions, so it runs wherever the writer runs (in serve's
    writer process by default)."""

    def __init__(self, store: ReadingStore, versions: VeeStore) -> None:
        self.store = store
        self.versions = versions
        self.conflicts = 0
        #: Lookups made for values that might replace a stored one (live data makes none).
        self.lookups = 0
        #: (meter, channel) -> the latest interval stored; asked of the store once for the whole
        #: fleet (None: not yet), then kept up to date with what this process writes.
        self._stored_up_to: dict[tuple[str, Obis], int] | None = None

    async def _watermarks(self) -> dict[tuple[str, Obis], int]:
        if self._stored_up_to is None:
            self.lookups += 1
            latest = await self.store.latest_intervals(WATCHED)
            self._stored_up_to = {key: to_ns(t) for key, t in latest.items()}
        return self._stored_up_to

    async def before_write(self, batch: Sequence[Series]) -> None:
        watched = [s for s in batch if s.kind == "interval" and s.channel in WATCHED and len(s)]
        if not watched:
            return
        watermarks = await self._watermarks()
        older: dict[tuple[str, Obis], list[tuple[int, float]]] = {}
        for s in watched:
            key = (s.meter, s.channel)
            latest = watermarks.get(key)
            watermarks[key] = max(max(s.times), latest) if latest is not None else max(s.times)
            if latest is None or min(s.times) > latest:
                continue  # newer than anything stored (or nothing stored): nothing to replace
            older.setdefault(key, []).extend(
                (t, v) for t, v in zip(s.times, s.values, strict=True) if t <= latest and v is not None)
        found: list[tuple[str, Obis, datetime, float]] = []
        for (meter, channel), points in older.items():
            if not points:
                continue
            self.lookups += 1
            first, last = from_ns(min(t for t, _ in points)), from_ns(max(t for t, _ in points))
            stored = {to_ns(s.timestamp): s.value for s in
                      await self.store.query(meter, channel, first - timedelta(microseconds=1), last)}  # fmt: skip
            for t, v in points:
                old = stored.get(t)
                if old is not None and abs(old - v) > 1e-9 * max(1.0, abs(old)):
                    found.append((meter, channel, from_ns(t), old))
        if found:
            log.warning("%d intervals arrived with a value different from the one stored; kept as doubtful",
                        len(found))  # fmt: skip
            self.conflicts += len(found)
            await asyncio.to_thread(self.versions.record_conflicts, found)


def touched_days(batch: Sequence[Series]) -> dict[str, set[int]]:
    """Per meter, the UTC days (epoch ns of their midnight) a stored batch put watched
    intervals in; an interval ending at midnight belongs to the day before."""
    days: dict[str, set[int]] = {}
    for s in batch:
        if s.kind == "interval" and s.channel in WATCHED and len(s):
            days.setdefault(s.meter, set()).update(((t - 1) // NS_PER_DAY) * NS_PER_DAY for t in s.times)
    return days


class ArrivalValidator:
    def __init__(self, vee: VeeService, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.vee = vee
        self.now = now
        self.check = ConflictCheck(vee.store, vee.versions)
        #: meter -> rule -> intervals failing it, in the meter's latest validated period
        self.last_flags: dict[str, Counter[str]] = {}
        self.validated = 0
        #: meter -> UTC days touched and not validated since
        self._dirty: dict[str, set[datetime]] = {}
        self._wake = asyncio.Event()

    @property
    def conflicts(self) -> int:
        return self.check.conflicts

    @property
    def lookups(self) -> int:
        return self.check.lookups

    async def before_write(self, batch: Sequence[Series]) -> None:
        await self.check.before_write(batch)

    async def after_write(self, batch: Sequence[Series]) -> None:
        self.note_stored(touched_days(batch))

    def note_stored(self, days: Mapping[str, Iterable[int]]) -> None:
        """Meter-days (epoch ns of their midnight) that stored data touched: validated once closed."""
        for meter, midnights in days.items():
            self._dirty.setdefault(meter, set()).update(from_ns(day) for day in midnights)
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
