"""Validation rules. Each looks at a meter's series and flags the slots that fail it.

A failed rule puts its IEC 61968-9 quality code (head-end = system 2; category 5 data
collection, category 6 validation) on the slot with the rule's name. Within category 6 the
standard leaves rule-specific indexes to the implementer (vendors number them from 1000);
this table is ours and is documented in docs/vee.md.

Interval rules run on what was read. Day rules (sum check, high/low) run after estimation,
on the values billing would see.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from statistics import mean
from zoneinfo import ZoneInfo

from headend.config import Meter, VeeConfig
from headend.model import CLOCK_INVALID_BIT, POWER_DOWN_BIT, Quality, meter_status
from headend.timegrid import boundary_of, ceil_to
from headend.vee.series import Series, Slot

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
#: Failing one of these makes the value unusable: it is estimated. Other failures leave the
#: read as it is, marked suspect.
HARD = frozenset({"gap", "duplicate", "alignment", "negative_delta", "rollback"})
#: The meter's quality code for a power failure.
POWER_FAILURE = "1.2.32"


@dataclass
class Context:
    """What the rules know beyond the series itself."""

    meter: Meter
    cfg: VeeConfig
    #: Confirmed disconnected periods (from the switching journal): [from, until).
    disconnected: list[tuple[datetime, datetime]] = field(default_factory=list)
    #: Power outages from the meter's event log: [from, until].
    outages: list[tuple[datetime, datetime]] = field(default_factory=list)
    #: Slots of earlier weeks (like-day history), by interval end.
    history: dict[datetime, Slot] = field(default_factory=dict)
    #: The multiplier in force at a time (the registry's, or a recorded exchange's).
    multiplier_at: Callable[[datetime], float] = lambda _t: 1.0
    #: False when no exchange changes the multiplier: one value for the whole series.
    multiplier_changes: bool = False

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.cfg.timezone)


def flag(slot: Slot, rule: str) -> None:
    slot.flags[rule] = CODES[rule]


def in_outage(slot: Slot, ctx: Context, step: timedelta) -> bool:
    if POWER_FAILURE in slot.qualities or meter_status(slot.qualities) & POWER_DOWN_BIT:
        return True
    return any(a < slot.t and slot.t - step < b for a, b in ctx.outages)


def gap(series: Series, ctx: Context) -> None:
    for s in series.slots:
        if s.value is None:
            flag(s, "gap")


def duplicate(series: Series, ctx: Context) -> None:
    for s in series.slots:
        if s.conflicts:
            flag(s, "duplicate")


def alignment(series: Series, ctx: Context) -> None:
    for s in series.slots:
        if s.misaligned:
            flag(s, "alignment")


def clock(series: Series, ctx: Context) -> None:
    """Captured by a clock the meter marked invalid or the head-end found off, unless the
    head-end moved it to its true interval end (time-adjusted, placed within tolerance)."""
    for s in series.slots:
        placed = Quality.TIME_ADJUSTED in s.qualities
        if Quality.CLOCK_DRIFT in s.qualities or (meter_status(s.qualities) & CLOCK_INVALID_BIT and not placed):
            flag(s, "clock")


def negative_delta(series: Series, ctx: Context) -> None:
    for s in series.slots:
        if s.value is not None and s.value < 0:
            flag(s, "negative_delta")


def rollback(series: Series, ctx: Context) -> None:
    """The register went backwards (and not by wrapping round its dials)."""
    if series.cumulative:
        for s in series.slots:
            if s.value is not None and s.value < 0:
                flag(s, "rollback")
    index = series.index()
    for (_t0, r0), (t1, r1) in itertools.pairwise(series.registers):
        modulus = 10.0**ctx.meter.register_digits * ctx.multiplier_at(t1)
        if r1 < r0 and not (r0 - r1 > modulus / 2) and (slot := index.get(ceil_to(t1, series.step))) is not None:
            flag(slot, "rollback")


def spike(series: Series, ctx: Context) -> None:
    for day in days(series, ctx.tz):
        values = sorted((s for s in day if s.value is not None), key=lambda s: s.value or 0.0, reverse=True)
        if len(values) < 3:
            continue
        top, third = values[0], values[2]
        assert top.value is not None and third.value is not None
        if top.value > ctx.cfg.spike_min_kwh and top.value > ctx.cfg.spike_ratio * max(third.value, 0.0):
            flag(top, "spike")


def prolonged_zero(series: Series, ctx: Context) -> None:
    needed = ctx.cfg.zero_run // series.step
    run: list[Slot] = []
    for s in [*series.slots, None]:
        if s is not None and s.value == 0 and not _disconnected(s, ctx, series.step):
            run.append(s)
            continue
        if len(run) >= needed:
            for z in run:
                flag(z, "prolonged_zero")
        run = []


def _disconnected(slot: Slot, ctx: Context, step: timedelta) -> bool:
    return any(a <= slot.t - step and slot.t <= b for a, b in ctx.disconnected) or in_outage(slot, ctx, step)


def after_disconnect(series: Series, ctx: Context) -> None:
    for s in series.slots:
        inside = any(a <= s.t - series.step and s.t <= b for a, b in ctx.disconnected)
        if inside and s.value is not None and s.value > ctx.cfg.after_disconnect_kwh:
            flag(s, "after_disconnect")


def multiplier(series: Series, ctx: Context) -> None:
    constant = ctx.multiplier_at(series.start) if not ctx.multiplier_changes else None
    for s in series.slots:
        expected = constant if constant is not None else ctx.multiplier_at(s.t)
        if s.value is not None and abs(s.multiplier - expected) > 1e-9 * expected:
            flag(s, "multiplier")


# -- day rules: run on the values after estimation ---------------------------------------


def day_of(slot: Slot, step: timedelta, tz: ZoneInfo) -> date:
    """The billing day an interval belongs to (the one ending at midnight closes the day before)."""
    return (slot.t - step).astimezone(tz).date()


def days(series: Series, tz: ZoneInfo) -> list[list[Slot]]:
    """The series cut into billing days in the configured time zone."""
    out: dict[date, list[Slot]] = {}
    for s in series.slots:
        out.setdefault(day_of(s, series.step, tz), []).append(s)
    return list(out.values())


def sum_check(series: Series, ctx: Context) -> None:
    """Between two register reads on interval boundaries, the intervals must add up to the
    register difference, within max(N register digits, share of the difference) per day."""
    # A register read within a tenth of an interval of a boundary counts for it (reads are
    # stamped when taken, a few seconds after the boundary).
    points: list[tuple[datetime, float]] = []
    for t, r in series.registers:
        boundary = boundary_of(t, series.step, series.step / 10)
        if boundary is not None and (not points or points[-1][0] != boundary):
            points.append((boundary, r))
    if not series.slots:
        return
    if series.cumulative:
        # From a load profile each interval is the difference of its two registers: only
        # the ones estimated in between can disagree with them.
        index = series.index()
        for s in series.slots:
            before = index.get(s.t - series.step)
            if s.status == "estimated" and s.value is not None and s.register is not None and before is not None \
                    and before.register is not None:  # fmt: skip
                difference = s.register - before.register
                digits = ctx.cfg.sum_tolerance_digits * ctx.meter.register_resolution * ctx.multiplier_at(s.t)
                if abs(s.value - difference) > max(digits, ctx.cfg.sum_tolerance_share * abs(difference)):
                    flag(s, "sum_check")
        points = [(t, r) for t, r in points if t not in index or index[t].register is None]  # separate reads only
    position = {slot.t: i for i, slot in enumerate(series.slots)}
    position[series.slots[0].t - series.step] = -1
    for (t0, r0), (t1, r1) in itertools.pairwise(points):
        if t0 not in position or t1 not in position:
            continue
        span = series.slots[position[t0] + 1 : position[t1] + 1]
        if not span or any(s.value is None for s in span):
            continue
        difference = r1 - r0
        total = sum(s.value for s in span if s.value is not None)
        days_spanned = max(1.0, (t1 - t0) / timedelta(days=1))
        digits = ctx.cfg.sum_tolerance_digits * ctx.meter.register_resolution * ctx.multiplier_at(t1)
        allowed = max(digits, ctx.cfg.sum_tolerance_share * abs(difference)) * days_spanned
        if abs(total - difference) > allowed:
            for s in span:
                flag(s, "sum_check")


def high_low(series: Series, ctx: Context) -> None:
    complete = timedelta(days=1) // series.step
    # Totals of the days in the history whose every interval is a usable read.
    usable: dict[date, float] = {}
    spoiled: set[date] = set()
    counts: Counter[date] = Counter()
    for s in ctx.history.values():
        d = day_of(s, series.step, ctx.tz)
        counts[d] += 1
        if s.usable and s.value is not None:
            usable[d] = usable.get(d, 0.0) + s.value
        else:
            spoiled.add(d)
    for day in days(series, ctx.tz):
        if len(day) != complete or any(s.value is None for s in day):
            continue
        total = sum(s.value or 0.0 for s in day)
        this = day_of(day[0], series.step, ctx.tz)
        earlier = [this - timedelta(weeks=w) for w in range(1, ctx.cfg.like_day_weeks + 1)]
        like = [usable[d] for d in earlier if d in usable and d not in spoiled and counts[d] == complete]
        if not like:
            continue
        average = mean(like)
        if average > 0 and (total > ctx.cfg.high_ratio * average or total < ctx.cfg.low_ratio * average):
            for s in day:
                flag(s, "high_low")


Rule = Callable[[Series, Context], None]
INTERVAL_RULES: dict[str, Rule] = {
    "gap": gap, "duplicate": duplicate, "alignment": alignment, "clock": clock,
    "negative_delta": negative_delta, "rollback": rollback, "spike": spike, "prolonged_zero": prolonged_zero,
    "after_disconnect": after_disconnect, "multiplier": multiplier,
}  # fmt: skip
DAY_RULES: dict[str, Rule] = {"sum_check": sum_check, "high_low": high_low}
