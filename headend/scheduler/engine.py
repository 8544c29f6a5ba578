"""The polling engine: read plans run over the fleet, link by link, never stalled by one meter.

For each selected meter: wait for a slot on its link (priority lane), open a session, check
the clock (drift measured; above the plan's tolerance the meter is synced if the plan says so
and the intervals read are flagged `2.6.16`), read the profile from the last stored interval
(or `history` back), read registers and the event log since the last stored event, and
commit everything to the outbox before the next meter's turn on that link. Retryable errors
are retried with backoff and jitter inside the plan's window; link-level failures feed the
link's circuit breaker.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import msgspec

from headend.breaker import CircuitBreaker
from headend.config import Plan
from headend.model import IMPORT_ENERGY, IMPORT_INTERVAL, Quality, Reading
from headend.protocols.base import LinkDown, MeterError, MeterSession, Timeout, Unsupported
from headend.protocols.modbus_intervals import build_intervals
from headend.registry import Registry
from headend.scheduler.admission import LinkAdmission
from headend.scheduler.gate import Lane
from headend.scheduler.placement import place_on_grid
from headend.storage.codec import from_ns, to_ns
from headend.storage.outbox import Outbox
from headend.timegrid import boundary_read_of, floor_to, nearest_boundary

log = logging.getLogger(__name__)
#: Meters lined up between two turns of the event loop when a plan run starts.
_PLAN_STEP = 500


#: How far back a first read of the frozen billing registers goes (two monthly periods).
FROZEN_HISTORY = timedelta(days=62)


class MeterResult(msgspec.Struct, gc=False):
    """One meter's read in a plan run. Not tracked by the garbage collector (it holds no
    cycles): a run over 100,000 meters keeps one each until the run's report is made, and
    the collector walking them all stalled the event loop for tens of ms at a time."""

    meter: str
    ok: bool
    readings: int = 0
    expected_intervals: int = 0
    received_intervals: int = 0
    missing: Sequence[datetime] = ()  # (empty: a tuple, not a list each)
    drift_s: float | None = None
    clock_synced: bool = False
    attempts: int = 0
    events: int = 0
    seconds: float = 0.0
    #: What the plan asked for that this meter cannot give (e.g. events over Modbus), with why.
    unsupported: tuple[str, ...] = ()
    #: Not tried this run: its own breaker, or its link's, is open.
    skipped: bool = False
    #: Profile values moved to their true interval end by the measured clock offset.
    time_adjusted: int = 0
    #: Profile values that could not be placed on the grid: held in quarantine, not stored.
    held: int = 0
    error: str = ""
    #: The MeterError class behind `error` (LinkDown, Timeout, Refused, BadFrame, Unsupported).
    error_type: str = ""

    @property
    def completeness(self) -> float:
        return 1.0 if not self.expected_intervals else self.received_intervals / self.expected_intervals


@dataclass
class PlanReport:
    plan: str
    started: datetime
    results: list[MeterResult]

    @property
    def succeeded(self) -> int:
        return sum(r.ok for r in self.results)


@dataclass
class EngineStats:
    sessions: int = 0
    failures: int = 0
    #: Meters not tried because a breaker (theirs or their link's) was open.
    skipped: int = 0
    last_progress: float = field(default_factory=time.monotonic)


class PollingEngine:
    def __init__(
        self,
        registry: Registry,
        outbox: Outbox,
        sessions: Callable[[str], MeterSession],
        *,
        admission: LinkAdmission | None = None,
        tcp_sessions: int = 64,
        breaker_threshold: int = 3,
        breaker_cooldown: float = 300.0,
        backoff: float = 1.0,
        jitter: float = 0.5,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """`clock`: the current time, for measuring a meter's drift and setting its clock (a
        plan's run started earlier: a meter read minutes into the run is compared with now)."""
        self.clock = clock
        self.registry = registry
        self.outbox = outbox
        self.sessions = sessions
        self.backoff = backoff
        self.jitter = jitter
        self.monotonic = monotonic
        self.sleep = sleep
        self.stats = EngineStats()
        self.admission = admission or LinkAdmission(registry, sessions, tcp_sessions=tcp_sessions)
        #: Per link (gateway, bus, concentrator): only the link's own failures (LinkDown).
        self.breakers: dict[str, CircuitBreaker] = {}
        #: Per meter: its own failures (no answer), so one dead unit behind a gateway never
        #: stalls its neighbours.
        self.meter_breakers: dict[str, CircuitBreaker] = {}
        #: Per link (or meter) breaker, the opening last logged as skipping meters.
        self._skips_said: dict[str, tuple[str, float]] = {}
        #: Per link: the meters that did not answer since the link's last success. Silence
        #: from several different meters in a row is the link's (a cut RS-485 line behind a
        #: gateway that still accepts TCP); one dead unit, however often asked, is not.
        self._silent: dict[str, set[str]] = {}
        self._boundary_cursors: dict[str, dict[str, int]] = {}
        self._breaker_args = (breaker_threshold, breaker_cooldown)
        self.stopping = False

    def breaker(self, key: str) -> CircuitBreaker:
        if key not in self.breakers:
            threshold, cooldown = self._breaker_args
            self.breakers[key] = CircuitBreaker(threshold, cooldown, self.monotonic)
        return self.breakers[key]

    def meter_breaker(self, meter_id: str) -> CircuitBreaker:
        if meter_id not in self.meter_breakers:
            threshold, cooldown = self._breaker_args
            self.meter_breakers[meter_id] = CircuitBreaker(threshold, cooldown, self.monotonic)
        return self.meter_breakers[meter_id]

    def stop(self) -> None:
        """Start no new sessions: reads in progress finish and commit, queued ones give up."""
        self.stopping = True

    async def run_plan(
        self,
        plan: Plan,
        now: datetime,
        lane: Lane = Lane.BULK,
        *,
        deadline_s: float | None = None,
        on_result: Callable[[MeterResult], None] | None = None,
    ) -> PlanReport:
        """Read every meter the plan selects. A meter not done `deadline_s` after the start is
        given up for this run (what it committed stays; its watermark brings it back next run).

        The meters wait in a line per link (per gate: a bus, a concentrator, the direct TCP
        meters' shared cap), read by as many workers as the gate carries sessions: tasks and
        waiters grow with the links, not with the meters (a plan over 100,000 meters starts
        in small steps, never one long stall of the event loop)."""
        loop = asyncio.get_running_loop()
        deadline = None if deadline_s is None else loop.time() + deadline_s

        def given_up(meter_id: str) -> MeterResult:
            result = MeterResult(meter_id, ok=False, error=f"plan deadline ({deadline_s:g} s) passed before the "
                                 "read finished")  # fmt: skip
            log.warning("%s: %s", meter_id, result.error)
            return result

        async def one(meter_id: str) -> MeterResult:
            if deadline is not None and loop.time() >= deadline:
                result = given_up(meter_id)  # still in line: no session opened
            elif self.stopping:
                result = MeterResult(meter_id, ok=False, error="server stopping: not read this run")
            else:
                try:
                    async with asyncio.timeout_at(deadline):
                        result = await self.read_meter(meter_id, plan, now, lane)
                except TimeoutError:
                    result = given_up(meter_id)
            if on_result is not None:
                on_result(result)
            return result

        results: dict[str, MeterResult] = {}
        lines: dict[int, _Line] = {}  # by gate

        async def work(line: _Line) -> None:
            try:
                while line.waiting:
                    meter_id = line.waiting.popleft()
                    results[meter_id] = await one(meter_id)
                    # A meter whose breaker is open is given up without any I/O: without this,
                    # a worker would run through thousands of them in one turn of the loop.
                    await asyncio.sleep(0)
            finally:
                line.workers -= 1

        meters = self.registry.select(plan.select)
        workers: list[asyncio.Task[None]] = []
        try:
            for n, meter in enumerate(meters, 1):
                _key, gate = self.admission.gate(meter.id)
                line = lines.setdefault(id(gate), _Line(gate.capacity))
                line.waiting.append(meter.id)
                if line.workers < line.capacity:  # a worker per session the gate carries, no more
                    line.workers += 1
                    workers.append(asyncio.create_task(work(line)))
                if n % _PLAN_STEP == 0:
                    await asyncio.sleep(0)  # let the loop breathe while a large fleet is lined up
            await asyncio.gather(*workers)
        finally:
            for task in workers:
                task.cancel()
            # No worker outlives the run (a restarted run or a closing server finds none).
            await asyncio.gather(*workers, return_exceptions=True)
        report = PlanReport(plan.id, now, [results[m.id] for m in meters if m.id in results])
        log.info("plan %s: %d/%d meters read", plan.id, report.succeeded, len(meters))
        return report

    async def read_meter(self, meter_id: str, plan: Plan, now: datetime, lane: Lane = Lane.BULK,
                         *, fresh: bool = False) -> MeterResult:  # fmt: skip
        """Read one meter for a plan. `fresh` reads the plan's whole history, ignoring (and
        leaving alone) the completeness watermark: an operator's on-demand look."""
        began = time.monotonic()
        result = await self._read_meter(meter_id, plan, now, lane, fresh)
        result.seconds = time.monotonic() - began
        return result

    async def _read_meter(self, meter_id: str, plan: Plan, now: datetime, lane: Lane, fresh: bool) -> MeterResult:
        key, _gate = self.admission.gate(meter_id)
        # A meter's own breaker exists once it has failed on its own (timed out): not one per
        # meter of a 100,000-meter site, each for the collector to walk.
        breaker, own = self.breaker(key), self.meter_breakers.get(meter_id)
        result = MeterResult(meter_id, ok=False)
        deadline = self.monotonic() + plan.window.total_seconds()
        for attempt in range(1, plan.attempts + 1):
            if breaker.is_open or (own is not None and own.is_open):
                which, open_one = (f"link {key}", breaker) if breaker.is_open or own is None else ("meter", own)
                wait = open_one.open_until - self.monotonic()
                result.error = f"{which} circuit open after {open_one.failures} failures; next try in {wait:.0f} s"
                result.error_type, result.skipped = "CircuitOpen", True
                self.stats.skipped += 1
                # Once per breaker and time it opened: a link down skips its hundreds of meters,
                # and a line each was a flood (98,000 on a site with 490 gateways down) that
                # also held the event loop. The skips are counted (reads{result="skipped"}).
                said, whose = (which, open_one.open_until), key if open_one is breaker else meter_id
                if self._skips_said.get(whose) != said:
                    self._skips_said[whose] = said
                    more = ", and its other meters while it stays open" if open_one is breaker else ""
                    log.warning("%s%s: not read by plan %s: %s", meter_id, more, plan.id, result.error)
                else:
                    log.debug("%s: not read by plan %s: %s", meter_id, plan.id, result.error)
                return result
            result.attempts = attempt
            try:
                async with self.admission.session(meter_id, lane) as session:
                    if self.stopping:
                        result.error = "server stopping: not read this run"
                        return result
                    await self._session(session, meter_id, plan, now, result, fresh)
                breaker.record(True)
                if own is not None:
                    own.record(True)
                self._silent.pop(key, None)
                result.ok, result.error = True, ""
                self.stats.last_progress = self.monotonic()
                return result
            except MeterError as exc:
                result.error = f"{type(exc).__name__}: {exc}"
                result.error_type = type(exc).__name__
                self.stats.failures += 1
                if isinstance(exc, LinkDown):
                    breaker.record(False)  # the gateway, bus or concentrator itself
                elif isinstance(exc, Timeout):
                    own = self.meter_breaker(meter_id)
                    own.record(False)  # this meter does not answer; its neighbours may
                    silent = self._silent.setdefault(key, set())
                    if meter_id not in silent:
                        silent.add(meter_id)
                        breaker.record(False)
                if not exc.retryable:
                    return result
            except Exception as exc:
                # A driver's bug, or an answer no check foresaw: this meter fails, with the
                # traceback in the log; the plan's other meters are read as usual.
                log.exception("%s: plan %s: the read failed unexpectedly", meter_id, plan.id)
                result.error = f"unexpected error: {type(exc).__name__}: {exc}"
                result.error_type = "Unexpected"
                self.stats.failures += 1
                return result
            pause = self.backoff * 2 ** (attempt - 1) * (1 + random.uniform(0, self.jitter))
            if attempt == plan.attempts or self.monotonic() + pause > deadline:
                break
            await self.sleep(pause)
        log.warning("%s: plan %s failed after %d attempts: %s", meter_id, plan.id, result.attempts, result.error)
        return result

    async def _session(self, session: MeterSession, meter_id: str, plan: Plan, now: datetime, result: MeterResult,
                       fresh: bool) -> None:  # fmt: skip
        self.stats.sessions += 1
        readings: list[Reading] = []
        cursors: dict[str, int] = {}
        drifting = False
        # A profile's rows are placed by the meter's clock offset: measured whenever one is read
        # (a meter without a clock, Modbus, has boundary reads stamped by the head-end instead).
        meter_time = None
        asked = answered = self.clock()
        if "clock" in plan.read:
            meter_time = await session.read_clock()
            answered = self.clock()
        elif "profile" in plan.read and session.profile_on_meter_clock:
            with contextlib.suppress(Unsupported):
                meter_time = await session.read_clock()
            answered = self.clock()
        if meter_time is not None:
            # The meter read its clock somewhere between the question and the answer: the middle.
            result.drift_s = (meter_time - (asked + (answered - asked) / 2)).total_seconds()
            drifting = abs(result.drift_s) > plan.clock_tolerance.total_seconds()
            if drifting and plan.sync_clock and "clock" in plan.read:
                await session.set_clock(self.clock())
                result.clock_synced = True
        # Rows stamped by the clock just measured are placed by its offset (drifting implies a drift).
        offset = None
        if drifting and result.drift_s is not None and session.profile_on_meter_clock:
            offset = timedelta(seconds=result.drift_s)
        if "billing" in plan.read:
            frozen_key = f"billing:{meter_id}"
            saved_at = None if fresh else self.outbox.cursors(frozen_key).get(frozen_key)
            since = from_ns(saved_at) if saved_at is not None else now - max(plan.history, FROZEN_HISTORY)
            try:
                frozen = await self._frozen(session, since, now, offset, plan.clock_tolerance)
            except Unsupported as exc:
                result.unsupported += (f"billing: {exc}",)
            else:
                readings += frozen
                if frozen and not fresh:
                    cursors[frozen_key] = to_ns(max(r.timestamp for r in frozen))
        if "profile" in plan.read:
            profile, watermark = await self._profile(session, meter_id, plan, now, result, fresh, offset)
            readings += profile
            if not fresh:
                cursors[_cursor_key(meter_id, plan)] = to_ns(watermark)
        if "registers" in plan.read:
            readings += await session.read_registers(plan.channels)
        if "events" in plan.read:
            events_key = f"events:{meter_id}"
            saved = None if fresh else self.outbox.cursors(events_key).get(events_key)
            since = from_ns(saved) if saved is not None else now - plan.history
            # A meter clock running ahead logs events "in the future": read up to its time too.
            until = now + timedelta(seconds=max(0.0, result.drift_s or 0.0) + 60)
            try:
                events = await session.read_events(since, until)
            except Unsupported as exc:
                result.unsupported += (f"events: {exc}",)
            else:
                readings += events
                result.events = len(events)
                if events and not fresh:
                    cursors[events_key] = to_ns(max(e.timestamp for e in events))
        if drifting and ("profile" not in plan.read or not session.profile_on_meter_clock):
            # Not placed by the offset (another device stamps them): flagged for validation.
            readings = [_flag(r, Quality.CLOCK_DRIFT) if r.kind == "interval" else r for r in readings]
        cursors |= self._boundary_cursors.pop(meter_id, {})
        # The profile cursor commits with the readings: it never runs ahead of what is stored.
        await self.outbox.accept(readings, cursors=cursors)
        result.readings = len(readings)

    @staticmethod
    async def _frozen(session: MeterSession, since: datetime, now: datetime, offset: timedelta | None,
                      tolerance: timedelta) -> list[Reading]:  # fmt: skip
        """The meter's frozen billing registers, at the true midnight each belongs to."""
        shift = offset or timedelta(0)
        frozen = await session.read_billing(since + shift, now + shift)
        placed = []
        for r in frozen:
            true_t = r.timestamp - shift
            day = nearest_boundary(true_t, timedelta(days=1))
            qualities = r.qualities
            if shift and day != r.timestamp:
                qualities = (*qualities, Quality.TIME_ADJUSTED)
            if abs(true_t - day) > tolerance:
                qualities = (*qualities, Quality.CLOCK_DRIFT)
            placed.append(dataclasses.replace(r, timestamp=day, qualities=qualities))
        return placed

    async def _profile(
        self, session: MeterSession, meter_id: str, plan: Plan, now: datetime, result: MeterResult, fresh: bool,
        offset: timedelta | None = None,
    ) -> tuple[list[Reading], datetime]:
        """Read from the completeness watermark (all intervals up to it are stored), so gaps are
        read again on every run until they fill or fall past `history` (the buffer depth).
        `offset`: the meter's clock error measured in this session; the range is asked in the
        meter's time and every row placed at the true interval end it belongs to."""
        step = plan.interval
        last_boundary = floor_to(now, step)
        oldest = last_boundary - plan.history
        key = _cursor_key(meter_id, plan)
        cursor = None if fresh else self.outbox.cursors(key).get(key)
        since = max(from_ns(cursor), oldest) if cursor is not None else oldest
        shift = offset or timedelta(0)
        try:
            read = await session.read_profile(plan.profile, since + shift, now + shift)
        except Unsupported:
            # No load profile in the meter (Modbus): intervals come from the energy register
            # read at each boundary, a missed boundary leaves its intervals marked missing.
            return await self._boundary_profile(session, meter_id, plan, now, result)
        placed = place_on_grid(read, offset, step, plan.clock_tolerance)
        readings = placed.readings
        result.time_adjusted = placed.adjusted
        if placed.held:
            result.held = len(placed.held)
            for reason in dict.fromkeys(why for _r, why in placed.held):
                group = [r for r, why in placed.held if why == reason]
                log.warning("%s: %d profile values held, not stored: %s", meter_id, len(group), reason)
                await asyncio.to_thread(self.outbox.hold_sync, group, f"{meter_id}: {reason}")
        got = {r.timestamp for r in readings if r.value is not None}
        expected = [since + k * step for k in range(1, (last_boundary - since) // step + 1)]
        result.expected_intervals = len(expected)
        result.received_intervals = sum(1 for t in expected if t in got)
        result.missing = tuple(t for t in expected if t not in got)
        watermark = result.missing[0] - step if result.missing else last_boundary
        return readings, watermark

    async def _boundary_profile(
        self, session: MeterSession, meter_id: str, plan: Plan, now: datetime, result: MeterResult
    ) -> tuple[list[Reading], datetime]:
        step = plan.interval
        (register,) = await session.read_registers([IMPORT_ENERGY])
        tolerance = min(timedelta(seconds=60), step / 10)
        boundary = boundary_read_of(register.timestamp, step, tolerance)
        readings: list[Reading] = [register]
        key_t, key_v = f"boundary:{meter_id}:t", f"boundary:{meter_id}:v"
        saved = self.outbox.cursors(f"boundary:{meter_id}:")
        if boundary is None or register.value is None:
            result.error = "register read too long after an interval boundary to count for one"
            return readings, from_ns(saved.get(key_t, to_ns(now)))
        if saved.get(key_t) == to_ns(boundary):
            # A later read for a boundary already read: the first, closer one stands.
            return readings, boundary
        if key_t in saved:
            previous = dataclasses.replace(register, timestamp=from_ns(saved[key_t]), value=saved[key_v] / 1e6)
            start = max(previous.timestamp, boundary - plan.history)
            intervals = build_intervals(meter_id, IMPORT_INTERVAL, [previous, register], start, boundary, step,
                                        tolerance, source=register.source)  # fmt: skip
            readings += intervals
            result.expected_intervals = len(intervals)
            result.received_intervals = sum(1 for r in intervals if r.value is not None)
            result.missing = tuple(r.timestamp for r in intervals if r.value is None)
        self._boundary_cursors[meter_id] = {key_t: to_ns(boundary), key_v: round(register.value * 1e6)}
        return readings, boundary


@dataclass
class _Line:
    """A plan run's meters waiting for one gate, and the workers reading them."""

    capacity: int
    workers: int = 0
    waiting: collections.deque[str] = field(default_factory=collections.deque)


def single_meter_plan(plan_id: str, meter_id: str, read: Sequence[str], history: timedelta,
                      channels: Sequence[str] = ()) -> Plan:  # fmt: skip
    """A plan for reading one meter once, now (on-demand reads, VEE re-reads): one attempt,
    `history` back; its schedule is never used."""
    return Plan.model_validate({"id": plan_id, "read": list(read), "channels": list(channels), "every": "1d",
                                "attempts": 1, "history": history, "select": {"meters": [meter_id]}})  # fmt: skip


def _cursor_key(meter_id: str, plan: Plan) -> str:
    return f"profile:{meter_id}:{plan.profile}"


def _flag(reading: Reading, code: str) -> Reading:
    return dataclasses.replace(reading, qualities=(*reading.qualities, code))
