"""Validation rules. Each looks at a meter's series and flags the slots that fail it.

A failed rule puts its IEC 61968-9 quality code (head-end = system 2; category 5 data
collection, category 6 validation) on the slot with the rule's name. Within category 6 the
standard leaves rule-specific indexes to the implementer (vendors number them from 1000);
this table is ours and is documented in docs/vee.md.

Interval rules run on what was read. Day rules (sum check, high/low) run after estimation,
on the values billing would see.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
from numpy.typing import NDArray

from headend.config import Meter, VeeConfig
from headend.model import CLOCK_INVALID_BIT, POWER_DOWN_BIT, Quality, meter_status
from headend.storage.codec import duration_ns, from_ns, to_ns
from headend.timegrid import boundaries_ns, ceil_ns
from headend.vee.series import ESTIMATED, Exchange, Mask, Series, Times

CODES: dict[str, str] = {
    "gap": Quality.MISSING.value,  # 2.5.259
    "duplicate": "2.6.1001",
    "alignment": "2.6.1002",
    "clock": Quality.CLOCK_DRIFT.value,  # 2.6.16, also set by the scheduler when it syncs
    "negative_delta": "2.6.1004",
    "rollback": "2.6.1005",
    "sum_check": "2.6.1006",
    "spike": "2.6.1007",
    "high_low": "2.6.1008",
    "prolonged_zero": "2.6.1009",
    "after_disconnect": "2.6.1010",
    "multiplier": "2.6.1011",
}
#: The order rules run in: a slot's quality codes are listed in it.
ORDER = ("gap", "duplicate", "alignment", "clock", "negative_delta", "rollback", "spike", "prolonged_zero",
         "after_disconnect", "multiplier", "sum_check", "high_low")  # fmt: skip
BITS = {name: 1 << i for i, name in enumerate(ORDER)}
#: Failing one of these makes the value unusable: it is estimated. Other failures leave the
#: read as it is, marked suspect.
HARD = frozenset({"gap", "duplicate", "alignment", "negative_delta", "rollback"})
HARD_BITS = sum(BITS[name] for name in HARD)
#: The meter's quality code for a power failure.
POWER_FAILURE = "1.2.32"
DAY = timedelta(days=1)


@dataclass
class Context:
    """What the rules know beyond the series itself."""

    meter: Meter
    cfg: VeeConfig
    #: Confirmed disconnected periods (from the switching journal): [from, until).
    disconnected: list[tuple[datetime, datetime]] = field(default_factory=list)
    #: Power outages from the meter's event log: [from, until].
    outages: list[tuple[datetime, datetime]] = field(default_factory=list)
    #: Recorded meter exchanges and CT/PT changes, oldest first.
    exchanges: list[Exchange] = field(default_factory=list)
    #: The whole window (the weeks before the period included): like days and anchors.
    history: Series | None = None

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.cfg.timezone)

    def multiplier_at(self, t: datetime) -> float:
        """The multiplier in force at `t`: the registry's, or the latest exchange's before it."""
        current = self.meter.multiplier
        for x in self.exchanges:
            if x.t < t:
                current = x.multiplier
        return current

    def multipliers(self, t: Times) -> np.ndarray:
        out = np.full(len(t), self.meter.multiplier)
        for x in self.exchanges:
            out[t > to_ns(x.t)] = x.multiplier
        return out


def flag(series: Series, where: Mask | np.ndarray, rule: str) -> None:
    series.flags[where] |= BITS[rule]


def failed(series: Series, rule: str) -> Mask:
    return (series.flags & BITS[rule]) != 0


def _during(t: Times, step_ns: int, periods: list[tuple[datetime, datetime]], *, closed: bool) -> Mask:
    """Slots (by interval end) overlapping any of the periods: [a, b] when `closed`, else the
    interval (t - step, t] within [a, b]."""
    out = np.zeros(len(t), np.bool_)
    for a, b in periods:
        a_ns, b_ns = to_ns(a), to_ns(b) if b.year < 9999 else np.iinfo(np.int64).max
        if closed:
            out |= (a_ns < t) & (t - step_ns < b_ns)
        else:
            out |= (a_ns <= t - step_ns) & (t <= b_ns)
    return out


def _power_down(qualities: tuple[str, ...]) -> bool:
    return POWER_FAILURE in qualities or bool(meter_status(qualities) & POWER_DOWN_BIT)


def in_outage(series: Series, ctx: Context) -> Mask:
    """Slots the meter marked as powered down, or overlapping an outage from its event log."""
    marked = series.qualities.test(series.quality, _power_down)
    return marked | _during(series.t, series.step_ns, ctx.outages, closed=True)


def gap(series: Series, ctx: Context) -> None:
    flag(series, np.isnan(series.value), "gap")


def duplicate(series: Series, ctx: Context) -> None:
    flag(series, series.conflicted, "duplicate")


def alignment(series: Series, ctx: Context) -> None:
    flag(series, series.misaligned, "alignment")


def _clock_off(qualities: tuple[str, ...]) -> bool:
    placed = Quality.TIME_ADJUSTED in qualities
    return Quality.CLOCK_DRIFT in qualities or bool(meter_status(qualities) & CLOCK_INVALID_BIT and not placed)


def clock(series: Series, ctx: Context) -> None:
    """Captured by a clock the meter marked invalid or the head-end found off, unless the
    head-end moved it to its true interval end (time-adjusted, placed within tolerance)."""
    flag(series, series.qualities.test(series.quality, _clock_off), "clock")


def negative_delta(series: Series, ctx: Context) -> None:
    flag(series, series.value < 0, "negative_delta")


def rollback(series: Series, ctx: Context) -> None:
    """The register went backwards (and not by wrapping round its dials)."""
    if series.cumulative:
        flag(series, series.value < 0, "rollback")
    rt, rv = series.registers
    if len(rt) < 2 or not len(series):
        return
    t1 = rt[1:]
    modulus = 10.0**ctx.meter.register_digits * ctx.multipliers(t1)
    back = (rv[1:] < rv[:-1]) & ~(rv[:-1] - rv[1:] > modulus / 2)
    step_ns = series.step_ns
    ends = ceil_ns(t1[back], step_ns)
    k = (ends - series.t[0]) // step_ns
    flag(series, k[(k >= 0) & (k < len(series))], "rollback")


@functools.lru_cache(maxsize=64)
def _midnights(first: date, last: date, tz: ZoneInfo) -> NDArray[np.int64]:
    """The first instant (epoch ns) of each local day after `first` up to `last` (a midnight
    that does not exist starts at the shift)."""
    days = [first + timedelta(days=k) for k in range(1, (last - first).days + 1)]
    return np.array([to_ns(datetime(d.year, d.month, d.day, tzinfo=tz).astimezone(UTC)) for d in days], np.int64)


def day_starts(series: Series, tz: ZoneInfo) -> tuple[list[date], list[int]]:
    """The billing days the series covers in the configured time zone, and the index of each
    one's first slot (the interval ending at midnight closes the day before)."""
    if not len(series):
        return [], []
    since = series.t - series.step_ns  # each interval's start
    first = (from_ns(int(since[0])).astimezone(tz)).date()
    last = (from_ns(int(since[-1])).astimezone(tz)).date()
    dates = [first + timedelta(days=k) for k in range((last - first).days + 1)]
    starts = np.searchsorted(since, _midnights(first, last, tz), side="left").tolist()
    return dates, [0, *starts]


def days(series: Series, tz: ZoneInfo) -> list[tuple[date, slice]]:
    """The series cut into billing days in the configured time zone."""
    dates, starts = day_starts(series, tz)
    if not dates:
        return []  # a period shorter than one interval has no slots
    ends = [*starts[1:], len(series)]
    return [(d, slice(a, b)) for d, a, b in zip(dates, starts, ends, strict=True) if b > a]


def spike(series: Series, ctx: Context) -> None:
    """A day's highest interval far above its third highest."""
    cut = days(series, ctx.tz)
    if not cut:
        return
    value = series.value
    lengths = np.array([s.stop - s.start for _d, s in cut])
    starts = np.array([s.start for _d, s in cut])
    day = np.repeat(np.arange(len(cut)), lengths)
    known = ~np.isnan(value)
    # Each day's slots from highest to lowest (no value last; equal ones in time order).
    order = np.lexsort((np.where(known, -value, np.inf), day))
    counts = np.bincount(day[known], minlength=len(cut))
    enough = counts >= 3
    top = order[starts[enough]]
    third = value[order[starts[enough] + 2]]
    high = (value[top] > ctx.cfg.spike_min_kwh) & (value[top] > ctx.cfg.spike_ratio * np.maximum(third, 0.0))
    flag(series, top[high], "spike")


def runs_of(mask: Mask) -> list[tuple[int, int]]:
    """[first, last] of each run of True."""
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1).tolist(), (np.flatnonzero(edges == -1) - 1).tolist(), strict=True))


def prolonged_zero(series: Series, ctx: Context) -> None:
    needed = ctx.cfg.zero_run // series.step
    quiet = _during(series.t, series.step_ns, ctx.disconnected, closed=False) | in_outage(series, ctx)
    for a, b in runs_of((series.value == 0) & ~quiet):
        if b - a + 1 >= needed:
            series.flags[a : b + 1] |= BITS["prolonged_zero"]


def after_disconnect(series: Series, ctx: Context) -> None:
    inside = _during(series.t, series.step_ns, ctx.disconnected, closed=False)
    flag(series, inside & (series.value > ctx.cfg.after_disconnect_kwh), "after_disconnect")


def multiplier(series: Series, ctx: Context) -> None:
    expected = ctx.multipliers(series.t) if ctx.exchanges else ctx.multiplier_at(series.start)
    off = np.abs(series.multiplier - expected) > 1e-9 * expected
    flag(series, off & ~np.isnan(series.value), "multiplier")


# -- day rules: run on the values after estimation ---------------------------------------


def sum_check(series: Series, ctx: Context) -> None:
    """Between two register reads on interval boundaries, the intervals must add up to the
    register difference, within max(N register digits, share of the difference) per day."""
    if not len(series):
        return
    step_ns = series.step_ns
    rt, rv = series.registers
    # A register read within a tenth of an interval of a boundary counts for it (reads are
    # stamped when taken, a few seconds after the boundary).
    boundary, near = boundaries_ns(rt, step_ns, duration_ns(series.step / 10))
    boundary, reads = boundary[near], rv[near]
    first = np.ones(len(boundary), np.bool_)  # of reads for one boundary in a row, the first
    first[1:] = boundary[1:] != boundary[:-1]
    boundary, reads = boundary[first], reads[first]
    resolution = ctx.cfg.sum_tolerance_digits * ctx.meter.register_resolution
    share = ctx.cfg.sum_tolerance_share
    t0_ns = int(series.t[0])
    if series.cumulative:
        # From a load profile each interval is the difference of its two registers: only
        # the ones estimated in between can disagree with them.
        difference = series.register[1:] - series.register[:-1]
        checked = (series.status[1:] == ESTIMATED) & ~np.isnan(series.value[1:]) & ~np.isnan(difference)
        k = np.flatnonzero(checked) + 1
        digits = resolution * ctx.multipliers(series.t[k])
        off = np.abs(series.value[k] - difference[k - 1]) > np.maximum(digits, share * np.abs(difference[k - 1]))
        flag(series, k[off], "sum_check")
        # Separate reads only: a boundary the load profile has a register for is checked above.
        at, offset = np.divmod(boundary - t0_ns, step_ns)
        inside = (at >= 0) & (at < len(series)) & (offset == 0)
        profiled = np.zeros(len(boundary), np.bool_)
        profiled[inside] = ~np.isnan(series.register[at[inside]])
        boundary, reads = boundary[~profiled], reads[~profiled]
    points = list(zip(boundary.tolist(), reads.tolist(), strict=True))
    values = series.value.tolist()
    for (b0, r0), (b1, r1) in itertools.pairwise(points):
        p0, p1 = (b0 - t0_ns) // step_ns, (b1 - t0_ns) // step_ns
        if not (-1 <= p0 < len(values) and -1 <= p1 < len(values)):
            continue
        span = values[p0 + 1 : p1 + 1]
        if not span or any(v != v for v in span):  # NaN: an interval without a value
            continue
        difference = r1 - r0
        days_spanned = max(1.0, (b1 - b0) / duration_ns(DAY))
        digits = resolution * ctx.multiplier_at(from_ns(b1))
        if abs(sum(span) - difference) > max(digits, share * abs(difference)) * days_spanned:
            series.flags[p0 + 1 : p1 + 1] |= BITS["sum_check"]


def _day_totals(series: Series, cut: list[tuple[date, slice]]) -> tuple[list[float], NDArray[np.bool_]]:
    """Each day's total (added in time order) and whether every one of its slots has a value."""
    values = series.value.tolist()
    totals = [sum(values[s]) for _d, s in cut]
    unknown = np.isnan(series.value)
    starts = [s.start for _d, s in cut]
    gaps = np.add.reduceat(unknown, starts) if starts else np.zeros(0, np.int64)
    return totals, gaps == 0


def high_low(series: Series, ctx: Context) -> None:
    history = ctx.history
    if history is None:
        return  # no like days to compare with
    complete = DAY // series.step
    # Totals of the days in the history whose every interval is a usable read.
    cut = days(history, ctx.tz)
    spoiled = np.add.reduceat(~history.usable(), [s.start for _d, s in cut]) if cut else []
    totals, _ = _day_totals(history, cut)
    like_total = {d: total for (d, s), total, bad in zip(cut, totals, spoiled, strict=True)
                  if s.stop - s.start == complete and not bad}  # fmt: skip
    cut = days(series, ctx.tz)
    totals, whole = _day_totals(series, cut)
    for (d, s), total, full in zip(cut, totals, whole, strict=True):
        if s.stop - s.start != complete or not full:
            continue
        like = [like_total[e] for w in range(1, ctx.cfg.like_day_weeks + 1) if (e := d - timedelta(weeks=w))
                in like_total]  # fmt: skip
        if not like:
            continue
        average = math.fsum(like) / len(like)
        if average > 0 and (total > ctx.cfg.high_ratio * average or total < ctx.cfg.low_ratio * average):
            series.flags[s] |= BITS["high_low"]


Rule = Callable[[Series, Context], None]
INTERVAL_RULES: dict[str, Rule] = {
    "gap": gap, "duplicate": duplicate, "alignment": alignment, "clock": clock,
    "negative_delta": negative_delta, "rollback": rollback, "spike": spike, "prolonged_zero": prolonged_zero,
    "after_disconnect": after_disconnect, "multiplier": multiplier,
}  # fmt: skip
DAY_RULES: dict[str, Rule] = {"sum_check": sum_check, "high_low": high_low}
assert tuple([*INTERVAL_RULES, *DAY_RULES]) == ORDER
