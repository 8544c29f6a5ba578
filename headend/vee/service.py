"""VEE for one meter and period: load, validate, estimate, apply edits, version, summarise.

The billing channel is the energy of each interval, 1-0:1.29.0 in kWh (primary side),
whatever the meter delivered: a cumulative load profile (1-0:1.8.0 at each interval end)
or interval energies. Every interval comes out with a status billing can act on:
`actual` (passed every rule, quality 2.0.1), `suspect` (a rule failed; the value is the
meter's), `estimated` (2.8.0, with the method), `edited` (2.7.0, by whom and why) or
`missing` (2.5.259, no value).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import msgspec
import numpy as np

from headend.config import Meter, VeeConfig
from headend.model import EVENT_LOG, Quality, Reading
from headend.registry import Registry
from headend.storage.base import ReadingStore
from headend.storage.codec import from_ns, to_ns
from headend.storage.columns import Columns
from headend.switching.journal import CommandJournal, CommandState
from headend.timegrid import ceil_to
from headend.vee import rules
from headend.vee.energies import IMPORT, PATTERN_RULES, Energy
from headend.vee.estimate import estimate
from headend.vee.series import ACTUAL, EDITED, ESTIMATED, MISSING, STATUS, SUSPECT, Series, build
from headend.vee.store import VeeStore, Version

log = logging.getLogger(__name__)

ESTIMATOR = "vee"
#: Decimal places when no register says otherwise (Wh resolution in kWh).
DEFAULT_DECIMALS = 3
POWER_DOWN_EVENT, POWER_UP_EVENT = 1, 2


class ValidatedInterval(msgspec.Struct, frozen=True, gc=False):
    """One interval as billing sees it (a struct without GC tracking: a month of them is made per
    validation, and it holds no cycles)."""

    t: datetime
    value: float | None
    status: str
    qualities: tuple[str, ...]
    rules: tuple[str, ...]
    version: int
    method: str | None


@dataclass
class Validation:
    meter: str
    start: datetime
    end: datetime
    step: timedelta
    unit: str
    intervals: list[ValidatedInterval]
    registers: list[Reading] = field(default_factory=list)
    rereads: int = 0
    #: The energy register at the period's start and end, where known.
    start_register: float | None = None
    end_register: float | None = None
    energy: Energy = IMPORT
    #: Decimal places of the meter's register (its resolution after scaler and CT/PT):
    #: every value served is rounded to them, so no binary float noise reaches a bill.
    decimals: int = DEFAULT_DECIMALS
    #: Where the start and end registers come from: a billing profile, the load profile, a read.
    start_register_source: str | None = None
    end_register_source: str | None = None

    def counts(self) -> dict[str, int]:
        return dict(Counter(i.status for i in self.intervals))


@dataclass(frozen=True)
class Determinants:
    meter: str
    start: datetime
    end: datetime
    start_register: float | None
    end_register: float | None
    #: None (with `consumption_reason`) when an interval of the period has no value, not even
    #: an estimate: a bill is never made on a partial or empty period.
    consumption_kwh: float | None
    max_demand_kw: float | None
    max_demand_at: datetime | None
    expected_intervals: int
    completeness: float  # share of intervals with an actual, validated value
    by_status: dict[str, int]
    by_quality: dict[str, int]
    consumption_reason: str | None = None
    energy: Energy = IMPORT
    decimals: int = DEFAULT_DECIMALS
    start_register_source: str | None = None
    end_register_source: str | None = None
    #: The meter's own maximum demand register (kW or kvar), the highest it reported in the
    #: period, and when it was reached.
    meter_max_demand: float | None = None
    meter_max_demand_at: datetime | None = None


Fetched = tuple[Columns, Columns, list[Reading], list[Reading]]  # cumulative, deltas, registers, events


@dataclass
class Loaded:
    series: Series  # the period
    history: Series  # the period with the weeks before it (anchors, like days)
    ctx: rules.Context
    registers: list[Reading]  # register reads inside the period
    start_register: float | None
    start_register_source: str | None
    end_register: float | None
    end_register_source: str | None
    decimals: int  # of the values the period was built from: the output's resolution


Reread = Callable[[str, datetime, datetime], Awaitable[object]]


class VeeService:
    def __init__(
        self,
        store: ReadingStore,
        versions: VeeStore,
        registry: Registry,
        cfg: VeeConfig,
        *,
        journal: CommandJournal | None = None,
        reread: Reread | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.now = now
        self.store = store
        self.versions = versions
        self.registry = registry
        self.cfg = cfg
        self.journal = journal
        self.reread = reread

    async def validate(self, meter_id: str, start: datetime, end: datetime, energy: Energy = IMPORT) -> Validation:
        meter = self.registry.meter(meter_id)
        step = self.cfg.interval
        start, end = ceil_to(start, step), ceil_to(end, step)

        claim = bool(self.reread is not None and self.cfg.reread_attempts and energy == IMPORT)
        fetched = await self._fetch(meter, start, end, energy)
        # The work after the queries is CPU: it runs in a worker thread (one hop) so the
        # server's event loop (switching, reads, the API) keeps answering meanwhile.
        loaded, gaps, intervals = await asyncio.to_thread(self._prepare, meter, start, end, fetched, energy, claim)
        rereads = 0
        if gaps and self.reread is not None:
            rereads = 1
            await self.reread(meter.id, min(gaps) - step, max(gaps))
            fetched = await self._fetch(meter, start, end, energy)
            loaded, _gaps, intervals = await asyncio.to_thread(self._prepare, meter, start, end, fetched, energy, False)
        return Validation(meter.id, start, end, step, energy.unit, intervals, loaded.registers, rereads,
                          loaded.start_register, loaded.end_register, energy, loaded.decimals,
                          loaded.start_register_source, loaded.end_register_source)  # fmt: skip

    def _prepare(self, meter: Meter, start: datetime, end: datetime, fetched: Fetched, energy: Energy,
                 claim: bool) -> tuple[Loaded, list[datetime], list[ValidatedInterval]]:  # fmt: skip
        """Build the series and validate it; or, when `claim` finds gaps the meter may be asked
        for again, stop there and name them (intervals left empty)."""
        loaded = self._load(meter, start, end, fetched, energy)
        if claim and (gaps := self._claim_rereads(meter.id, loaded.series)):
            return loaded, gaps, []
        return loaded, [], self._validate(meter, start, loaded.series, loaded.history, loaded.ctx, energy,
                                          loaded.decimals)  # fmt: skip

    def _claim_rereads(self, meter_id: str, series: Series) -> list[datetime]:
        """The gaps (runs of missing intervals, by their ends) that may be re-read now; what
        is asked is recorded first, so each gap costs the meter a bounded number of sessions."""
        now = self.now()
        gaps = rules.runs_of(np.isnan(series.value) & (series.t <= to_ns(now)))
        # gap start -> its last missing interval
        starts = {from_ns(int(series.t[a])): from_ns(int(series.t[b])) for a, b in gaps}
        claimed = self.versions.claim_rereads(meter_id, list(starts), now, attempts=self.cfg.reread_attempts,
                                              spacing=self.cfg.reread_spacing)  # fmt: skip
        return [t for first in claimed for t in (first, starts[first])]

    def _validate(self, meter: Meter, start: datetime, series: Series, history: Series,
                  ctx: rules.Context, energy: Energy, decimals: int) -> list[ValidatedInterval]:  # fmt: skip
        wanted = set(self.cfg.rules) - (set() if energy.pattern_rules else PATTERN_RULES)
        for name, rule in rules.INTERVAL_RULES.items():
            if name in wanted:
                rule(history, ctx)
        ctx.history = history
        estimate(history, ctx, after=start)  # the weeks before count as anchors and like days
        for name, rule in rules.DAY_RULES.items():
            if name in wanted:
                rule(series, ctx)
        return self._finish(meter, series, energy, decimals)

    def _history_start(self, start: datetime) -> datetime:
        """How far back a validation of a period starting at `start` reads (its like days)."""
        return start - timedelta(weeks=self.cfg.like_day_weeks) - self.cfg.interval

    async def _fetch(self, meter: Meter, start: datetime, end: datetime, energy: Energy) -> Fetched:
        step = self.cfg.interval
        since = self._history_start(start)
        # One after the other: asked at once, their threads fight over the GIL (30 % slower).
        cumulative = await self.store.query_columns(meter.id, energy.register, since - step, end)
        deltas = Columns.empty() if len(cumulative) else await self.store.query_columns(meter.id, energy.interval,
                                                                                          since, end)  # fmt: skip
        registers = await self.store.query(meter.id, energy.register, since, end + step, kind="register")
        events = await self.store.query(meter.id, EVENT_LOG, since - timedelta(days=1), end + step, kind="event")
        return cumulative, deltas, registers, events

    def _load(self, meter: Meter, start: datetime, end: datetime, fetched: Fetched, energy: Energy) -> Loaded:
        step = self.cfg.interval
        since = self._history_start(start)
        cumulative, deltas, registers, events = fetched
        exchanges = self.versions.exchanges(meter.id)
        source = energy.register if len(cumulative) else energy.interval
        conflicts = self.versions.conflicts(meter.id, source, since - step, end)
        history = build(meter.id, since, end, step, cumulative=cumulative if len(cumulative) else None,
                        deltas=deltas, registers=Columns.of_readings(registers), exchanges=exchanges,
                        conflicts=conflicts, register_modulus=10.0**meter.register_digits)  # fmt: skip
        series = history.period(start, end)
        ctx = rules.Context(meter, self.cfg, disconnected=self._disconnected(meter.id), outages=_outages(events),
                            exchanges=exchanges)  # fmt: skip
        in_period = [r for r in registers if start < r.timestamp <= end]
        reads = [r for r in registers if r.value is not None and start - step < r.timestamp <= end + step]

        def register_at(t: datetime) -> tuple[float | None, str | None]:
            """The meter's frozen billing register at the boundary, else its load profile there,
            else the register read nearest to it (within one interval); and where it came from."""
            frozen = [r for r in reads if r.timestamp == t and "billing-" in r.source]
            if frozen:
                return frozen[0].value, frozen[0].source.split(" ", 1)[-1].replace("billing-", "billing profile ", 1)
            at = np.flatnonzero((cumulative.ts == to_ns(t)) & ~np.isnan(cumulative.value))
            if len(at):
                return float(cumulative.value[at[-1]]), "load profile"
            close = [r for r in reads if abs(r.timestamp - t) <= step]
            if not close:
                return None, None
            nearest = min(close, key=lambda r: abs(r.timestamp - t))
            return nearest.value, f"register read at {nearest.timestamp.isoformat()}"

        given = np.concatenate((cumulative.value, deltas.value, [np.nan if r.value is None else r.value
                                                                 for r in registers[:200]]))[:200]  # fmt: skip
        return Loaded(series, history, ctx, in_period, *register_at(start), *register_at(end),
                      _decimals(given[~np.isnan(given)].tolist()))  # fmt: skip

    def _disconnected(self, meter_id: str) -> list[tuple[datetime, datetime]]:
        if self.journal is None:
            return []
        periods, opened = [], None
        done = (CommandState.CONFIRMED, CommandState.CONFIRMED_READY)
        for c in self.journal.find(meter=meter_id):
            if c.state not in done:
                continue
            at = from_ns(c.updated_ns)
            if c.action.value == "disconnect" and c.state == CommandState.CONFIRMED:
                opened = opened or at
            elif opened is not None:
                periods.append((opened, at))
                opened = None
        if opened is not None:
            periods.append((opened, datetime.max.replace(tzinfo=UTC)))
        return periods

    def _finish(self, meter: Meter, series: Series, energy: Energy, decimals: int) -> list[ValidatedInterval]:
        n = len(series)
        if not n:
            return []
        value, flags = series.value, series.flags
        unknown = np.isnan(value)
        status = np.where(series.status == ESTIMATED, ESTIMATED,
                          np.where(unknown, MISSING, np.where(flags != 0, SUSPECT, ACTUAL)))  # fmt: skip
        versions = self.versions.versions(meter.id, energy.interval, series.start, series.end)
        version = np.zeros(n, np.int64)
        method = series.method.copy()
        edits: dict[int, Version] = {}
        new_estimates: list[int] = []
        for t, history in versions.items():
            i = series.position(to_ns(t))
            if i is None:
                continue
            edit = next((v for v in reversed(history) if v.status == "edited"), None)
            if edit is not None:
                edits[i] = edit
                status[i], version[i], method[i] = EDITED, edit.version, "edit"
        for i in np.flatnonzero(status == ESTIMATED).tolist():
            history = versions.get(from_ns(int(series.t[i])), [])
            latest = history[-1] if history else None
            same = (latest is not None and latest.status == "estimated" and latest.method == method[i]
                    and latest.value is not None
                    and abs(latest.value - value[i]) <= 1e-9 * max(1.0, abs(value[i])))  # fmt: skip
            if same and latest is not None:
                version[i] = latest.version
            else:
                new_estimates.append(i)
        if new_estimates:
            numbers = self.versions.add_many(
                meter.id, energy.interval,
                [(from_ns(int(series.t[i])), float(value[i]), method[i],
                  tuple(dict.fromkeys([Quality.ESTIMATED.value, *_codes(int(flags[i]))]))) for i in new_estimates],
                status="estimated", author=ESTIMATOR, reason="validation estimate",
            )  # fmt: skip
            version[new_estimates] = numbers
        qualities = _qualities(series, status, unknown)
        names = {f: tuple(sorted(n for n, bit in rules.BITS.items() if f & bit)) for f in np.unique(flags).tolist()}
        values = _rounded(value, decimals)
        for i, edit in edits.items():
            values[i] = None if edit.value is None else round(edit.value, decimals)
        times = list(itertools.accumulate(itertools.repeat(series.step, n - 1), initial=from_ns(int(series.t[0]))))
        statuses = [STATUS[s] for s in status.tolist()]
        rule_names = [names[f] for f in flags.tolist()]
        return list(map(ValidatedInterval, times, values, statuses, qualities, rule_names, version.tolist(),
                        method.tolist()))

    async def edit(self, meter_id: str, t: datetime, value: float, *, who: str, reason: str,
                   energy: Energy = IMPORT) -> int:  # fmt: skip
        """An authorised correction of one interval: a new version, the reads stay as they were."""
        self.registry.meter(meter_id)
        step = self.cfg.interval
        if t != ceil_to(t, step):
            raise ValueError(f"{t.isoformat()} is not an interval end on the {step} grid")
        # An fsynced transaction: in a thread, so a slow disk never holds up the event loop.
        return await asyncio.to_thread(self.versions.add, meter_id, energy.interval, t, value, status="edited",
                                       method="edit", qualities=(Quality.EDITED.value,), author=who,
                                       reason=reason)  # fmt: skip

    async def determinants(self, meter_id: str, start: datetime, end: datetime,
                           energy: Energy = IMPORT) -> Determinants:  # fmt: skip
        v = await self.validate(meter_id, start, end, energy)
        values = [(i.t, i.value) for i in v.intervals if i.value is not None]
        unknown = len(v.intervals) - len(values)
        consumption = round(sum(x for _t, x in values), v.decimals) if not unknown else None
        reason = None
        if unknown:
            reason = (f"no data for the period ({unknown} intervals missing)" if not values else
                      f"{unknown} of {len(v.intervals)} intervals have no value, not even an estimate")  # fmt: skip
        peak = max(values, key=lambda p: p[1], default=None)
        hours = v.step / timedelta(hours=1)
        actual = sum(1 for i in v.intervals if i.status == "actual")
        qualities: Counter[str] = Counter(q for i in v.intervals for q in i.qualities)
        demands = [r for r in await self.store.query(meter_id, energy.demand, start, end, kind="register")
                   if r.value is not None]  # fmt: skip
        own = max(demands, key=lambda r: r.value or 0.0, default=None)
        own_kw = None
        if own is not None and own.value is not None:
            own_kw = own.value / 1000 if own.unit in ("W", "var") else own.value
        return Determinants(
            meter_id, v.start, v.end, v.start_register, v.end_register, consumption,
            round(peak[1] / hours, v.decimals) if peak else None, peak[0] if peak else None, len(v.intervals),
            actual / len(v.intervals) if v.intervals else 1.0, v.counts(), dict(qualities), reason, energy,
            v.decimals, v.start_register_source, v.end_register_source,
            own_kw, own.timestamp if own is not None else None,
        )  # fmt: skip


def _rounded(values: np.ndarray, decimals: int) -> list[float | None]:
    """Values rounded as Python's round() does (NaN: None), at numpy's speed: numpy rounds
    x * 10**d, which can land on the other side of a half when that product is inexact; the
    values within a hair of a half are rounded by round() itself."""
    with np.errstate(over="ignore", invalid="ignore"):  # values near float's limit: round() below
        scaled = values * 10.0**decimals
        out = (np.round(scaled) / 10.0**decimals).astype(object)
        near_half = np.abs(np.abs(scaled - np.trunc(scaled)) - 0.5) < np.maximum(1e-6, np.abs(scaled) * 1e-12)
    near_half |= np.isinf(scaled) & ~np.isnan(values)
    for i in np.flatnonzero(near_half).tolist():
        out[i] = round(float(values[i]), decimals)
    out[np.isnan(values)] = None
    return out.tolist()  # type: ignore[no-any-return]


def _codes(flags: int) -> list[str]:
    """The quality codes of the rules a slot failed, in the order the rules ran."""
    return [rules.CODES[name] for name, bit in rules.BITS.items() if flags & bit]


def _qualities(series: Series, status: np.ndarray, unknown: np.ndarray) -> list[tuple[str, ...]]:
    """Each slot's qualities as billing sees them, worked out once per distinct combination of
    status, the meter's qualities, rules failed and value known."""
    missing = Quality.MISSING.value
    spaces = (len(series.qualities.tuples), 1 << len(rules.BITS), 2)
    key = ((status.astype(np.int64) * spaces[0] + series.quality) * spaces[1] + series.flags) * 2 + unknown
    distinct, which = np.unique(key, return_inverse=True)
    table = []
    for k in distinct.tolist():
        rest, no_value = divmod(k, 2)
        rest, flags = divmod(rest, spaces[1])
        state, number = divmod(rest, spaces[0])
        codes = [c for c in _codes(flags) if c != missing or no_value]
        own = series.qualities.tuples[number]
        made = {EDITED: (Quality.EDITED.value, *codes), MISSING: (missing, *codes), SUSPECT: (*own, *codes),
                ESTIMATED: (Quality.ESTIMATED.value, *(c for c in codes if c != missing)),
                ACTUAL: (*own, Quality.VALIDATED.value)}[state]  # fmt: skip
        table.append(tuple(dict.fromkeys(made)))
    return [table[w] for w in which.tolist()]


def _decimals(values: list[float]) -> int:
    """The decimal places of the finest value the meter gave (at most 9)."""
    places = [_places(v) for v in values]
    return min(max(places), 9) if places else DEFAULT_DECIMALS


def _places(value: float) -> int:
    text = repr(value)
    if "e" not in text and "." in text:
        return len(text) - text.index(".") - 1  # as Decimal counts them: 1.0 has one
    exponent = Decimal(text).as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


def _outages(events: list[Reading]) -> list[tuple[datetime, datetime]]:
    periods, down = [], None
    for e in events:
        if e.value == POWER_DOWN_EVENT:
            down = down or e.timestamp
        elif e.value == POWER_UP_EVENT and down is not None:
            periods.append((down, e.timestamp))
            down = None
    return periods
