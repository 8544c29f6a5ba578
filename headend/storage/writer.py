"""Drains the outbox into a ReadingStore in batches.

Rows are deleted only after the store confirmed them, so a crash anywhere replays at most
one batch, which the store absorbs (a point's identity is measurement, meter, channel, time).
Store down: back off (with jitter) and try again, the outbox grows and `depth` shows it.
Store refuses a batch: split it until the refused readings are isolated, then quarantine
those with the store's reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from headend.model import Obis, Reading
from headend.storage.base import ReadingStore, StoreRejected, StoreUnavailable
from headend.storage.outbox import Outbox, Pending
from headend.storage.series import Series, count

log = logging.getLogger(__name__)

BatchHook = Callable[[Sequence[Series]], Awaitable[None]]


@dataclass
class WriterStats:
    written: int = 0
    batches: int = 0
    store_failures: int = 0
    quarantined: int = 0
    last_error: str | None = None
    depth: int = 0
    healthy: bool = True
    #: A before/after-write hook (VEE) raised: logged and counted, the batch is written anyway.
    hook_failures: int = 0
    #: The outbox itself failed (disk full, I/O error): the writer backs off and goes on.
    outbox_failures: int = 0


async def until_drained(drained: asyncio.Event, outbox: Outbox) -> None:
    """Wait for `drained` (set by a writer each time it finds the outbox empty) to hold with the
    outbox really empty: readings accepted after it was set clear it again."""
    while True:
        await drained.wait()
        if outbox.depth() == 0:
            return
        drained.clear()


#: Per (kind, meter, channel) of a batch, the first and last time it writes.
Spans = dict[tuple[str, str, Obis], tuple[int, int]]


def _spans(batch: Sequence[Pending]) -> Spans:
    out: Spans = {}
    for p in batch:
        s = p.series
        if s is not None and len(s):
            key, lo, hi = (s.kind, s.meter, s.channel), min(s.times), max(s.times)
            if key in out:
                lo, hi = min(lo, out[key][0]), max(hi, out[key][1])
            out[key] = (lo, hi)
    return out


def _overlap(a: Spans, b: Spans) -> bool:
    small, large = (a, b) if len(a) <= len(b) else (b, a)
    return any((span := large.get(key)) is not None and lo <= span[1] and span[0] <= hi
               for key, (lo, hi) in small.items())  # fmt: skip


class BatchWriter:
    def __init__(
        self,
        outbox: Outbox,
        store: ReadingStore,
        *,
        batch_size: int = 5000,
        min_backoff: float = 0.1,
        max_backoff: float = 30.0,
        poll_interval: float = 1.0,
        linger: float = 0.0,
        in_flight: int = 2,
        warn_depth: int = 1_000_000,
        before_write: BatchHook | None = None,
        after_write: BatchHook | None = None,
        on_drained: Callable[[], None] | None = None,
    ) -> None:
        self.outbox = outbox
        self.store = store
        self.batch_size = batch_size
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.poll_interval = poll_interval
        #: After a batch smaller than batch_size, wait this long for more before the next one:
        #: data trickling in (a message of 100 values at a time) goes to the store in batches
        #: of thousands, not in a request per message.
        self.linger = linger
        self.in_flight = in_flight
        self.warn_depth = warn_depth
        #: Called with each batch before it is written (e.g. VEE noting values it will replace)
        #: and after the store confirmed it (e.g. VEE validating what arrived). A hook's error
        #: is logged and counted and never holds the data back: storing it is what matters.
        self.before_write = before_write
        self.after_write = after_write
        #: Called each time the writer finds the outbox empty (a writer process tells serve).
        self.on_drained = on_drained
        self.stats = WriterStats()
        self._backoff = min_backoff
        self._stop = asyncio.Event()
        self._new_data = outbox.new_data_event()
        self._drained = asyncio.Event()

    async def run(self) -> None:
        """Write until `stop()`; never returns on store errors, only backs off.

        Up to `in_flight` batches are on their way at once: the next batch is taken and
        turned into the store's format while the store works on the one before. A batch
        that writes an interval a batch in flight also writes waits for it to land (the
        later value must be stored last), and after a failure everything in flight lands
        and the rows still there are taken again, in order."""
        self._backoff = self.min_backoff
        small = False
        after = 0  # rows up to this id are taken (in flight or done)
        flying: dict[asyncio.Task[None], Spans] = {}
        while not self._stop.is_set():
            if len(flying) >= self.in_flight or (flying and small):
                if not await self._land(flying, wait_all=False):
                    after = 0
                continue
            if small and self.linger:
                await self._wait(self.linger, wake_on_data=False)
            self._new_data.clear()
            try:
                batch = await self.outbox.take(self.batch_size, after=after)
            except (sqlite3.Error, OSError) as exc:
                await self._failed(exc)
                continue
            if not batch:
                if flying:
                    small = True  # wait for what is in flight before looking again
                    continue
                after = 0
                try:
                    self.stats.depth = await self.outbox.recount()
                except (sqlite3.Error, OSError) as exc:
                    await self._failed(exc)
                    continue
                self._drained.set()
                if self.on_drained is not None:
                    self.on_drained()
                await self._wait(self.poll_interval, wake_on_data=True)
                small = False
                continue
            self._drained.clear()
            small = sum(p.n for p in batch) < self.batch_size
            mine = _spans(batch)
            if any(_overlap(mine, theirs) for theirs in flying.values()):
                # Taken again (from the same row) once nothing is in flight before it.
                if not await self._land(flying, wait_all=True):
                    after = 0
                continue
            after = batch[-1].id
            flying[asyncio.create_task(self._write(batch), name="outbox-batch")] = mine
        await self._land(flying, wait_all=True)

    async def _land(self, flying: dict[asyncio.Task[None], Spans], *, wait_all: bool) -> bool:
        """Wait for one batch in flight (or all); False if one failed, after everything in
        flight has landed and the failure was dealt with (backed off, counted)."""
        if not flying:
            return True
        done, _ = await asyncio.wait(flying, return_when=asyncio.ALL_COMPLETED if wait_all else asyncio.FIRST_COMPLETED)
        failures = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
        if failures:
            if flying.keys() - done:
                await asyncio.wait(flying)
            flying.clear()
            await self._failed(failures[0])  # type: ignore[arg-type]
            return False
        for task in done:
            del flying[task]
        self._backoff = self.min_backoff
        self.stats.healthy = True
        return True

    async def _failed(self, exc: BaseException) -> None:
        backoff, self._backoff = self._backoff, min(self._backoff * 2, self.max_backoff)
        if isinstance(exc, sqlite3.Error | OSError):
            await self._outbox_failed(exc, backoff)
        elif isinstance(exc, StoreUnavailable):
            self._note_failure(str(exc))
            await self._wait(backoff * random.uniform(0.5, 1.0), wake_on_data=False)
        else:
            raise exc

    async def _write(self, batch: Sequence[Pending]) -> None:
        damaged = [p for p in batch if p.series is None]
        if damaged:
            await self._quarantine(damaged, "outbox row does not decode into readings")
            batch = [p for p in batch if p.series is not None]
            if not batch:
                return
        items = [p.series for p in batch if p.series is not None]
        if self.before_write is not None:
            try:
                await self.before_write(items)
            except StoreUnavailable:
                raise
            except Exception:
                self.stats.hook_failures += 1
                log.exception("before-write hook failed; the batch is written without it")
        stored: list[Series] = []
        refused: list[tuple[Reading, str]] = []
        await self._store(items, stored, refused)
        for reading, reason in refused:
            log.error("store refused a reading of %s %s at %s, quarantined: %s", reading.meter, reading.channel,
                      reading.timestamp.isoformat(), reason)  # fmt: skip
        await self.outbox.settle(batch, refused)
        self.stats.written += count(stored)
        self.stats.quarantined += len(refused)
        self.stats.batches += 1
        if self.after_write is not None and stored:
            try:
                await self.after_write(stored)
            except Exception:  # what is stored stays stored; the hook's failure is its own
                self.stats.hook_failures += 1
                log.exception("after-write hook failed")

    async def _store(self, items: list[Series], stored: list[Series], refused: list[tuple[Reading, str]]) -> None:
        """Write `items`; what the store refuses is halved until each refused reading is alone.
        Anything else that goes wrong with a batch (a bug, a row no store can take) is treated
        the same way: those readings are kept aside, the rest flow on, nothing is lost."""
        try:
            await self.store.write_series(items)
        except StoreUnavailable:
            raise
        except Exception as exc:
            reason = str(exc)
            if not isinstance(exc, StoreRejected):
                log.exception("writing a batch of %d readings failed", count(items))
                reason = f"could not be written: {type(exc).__name__}: {exc}"
            if count(items) <= 1:
                refused += [(r, reason) for s in items for r in s.readings()]
                return
            if len(items) > 1:
                halves = (items[: len(items) // 2], items[len(items) // 2 :])
            else:
                first, second = items[0].split()
                halves = ([first], [second])
            for half in halves:
                await self._store(half, stored, refused)
            return
        stored += items

    async def _quarantine(self, items: Sequence[Pending], reason: str) -> None:
        for p in items:
            log.error("outbox row %d quarantined: %s; body %s", p.id, reason, p.body[:500])
        await self.outbox.quarantine(items, reason)
        self.stats.quarantined += sum(p.n for p in items)

    async def _outbox_failed(self, exc: BaseException, backoff: float) -> None:
        """The outbox's own database failed (disk full, I/O error): nothing is lost (rows are
        deleted only after the store confirmed them), the writer waits and tries again."""
        self.stats.outbox_failures += 1
        self.stats.healthy = False
        self.stats.last_error = f"outbox: {exc}"
        log.error("outbox %s failed (%s); the writer tries again in %.1f s", self.outbox.path, exc, backoff)
        await self._wait(backoff * random.uniform(0.5, 1.0), wake_on_data=False)

    def _note_failure(self, message: str) -> None:
        self.stats.store_failures += 1
        self.stats.last_error = message
        self.stats.healthy = False
        depth = self.outbox.depth()
        self.stats.depth = depth
        level = logging.WARNING if depth >= self.warn_depth or self.stats.store_failures == 1 else logging.INFO
        log.log(level, "store unavailable (%s); outbox holds %d readings, retrying", message, depth)

    async def _wait(self, seconds: float, *, wake_on_data: bool) -> None:
        waits = [asyncio.ensure_future(self._stop.wait())]
        if wake_on_data:
            waits.append(asyncio.ensure_future(self._new_data.wait()))
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            for w in waits:
                with contextlib.suppress(asyncio.CancelledError):
                    await w

    async def wait_drained(self) -> None:
        """Return once the writer has found the outbox empty after the last accept."""
        await until_drained(self._drained, self.outbox)

    def stop(self) -> None:
        self._stop.set()
