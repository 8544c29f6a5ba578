"""Estimation of the intervals validation left without a usable value.

In order, per run of consecutive unusable slots:
1. (before this module) the scheduler re-reads the meter for the period: see VeeService;
2. linear interpolation between the usable neighbours, for runs up to `interpolate_max`,
   never anchored on an interval inside a power outage;
3. otherwise the like-day shape: the average of the same weekday and time in the last
   `like_day_weeks` weeks (usable values only);
4. then, where the register is known on both sides of the run, the estimates are scaled so
   the run adds up to the register difference (less what the actual intervals in between
   consumed), so the bill matches the register.
Estimated slots get quality 2.8.0 and `method` (interpolation | like_day | flat, + "scaled").
"""

from __future__ import annotations

from datetime import datetime, timedelta
from statistics import mean

from headend.model import Quality
from headend.vee.rules import HARD, Context, in_outage
from headend.vee.series import Series, Slot


def needs_estimate(slot: Slot) -> bool:
    return slot.value is None or bool(HARD & slot.flags.keys())


def runs(series: Series) -> list[list[int]]:
    out: list[list[int]] = []
    for i, slot in enumerate(series.slots):
        if needs_estimate(slot):
            if out and out[-1][-1] == i - 1:
                out[-1].append(i)
            else:
                out.append([i])
    return out


def _register_total(series: Series, run: list[int]) -> float | None:
    """Register difference across the run, from the registers at the slot before and the last slot."""
    first, last = run[0], run[-1]
    if not series.cumulative or first == 0:
        return None
    before, end = series.slots[first - 1].register, series.slots[last].register
    if before is None or end is None:
        return None
    # A hard-failed slot's own register may be the faulty one (a rollback): the run then
    # has no trustworthy total.
    if any("rollback" in series.slots[i].flags or series.slots[i].conflicts for i in run):
        return None
    return end - before


def estimate(series: Series, ctx: Context, *, after: datetime | None = None) -> None:
    """Estimate every run of unusable slots (only those reaching past `after`, if given)."""
    step = series.step
    for run in runs(series):
        if after is not None and series.slots[run[-1]].t <= after:
            continue
        shape, method = _interpolate(series, run, ctx, step)
        if shape is None:
            shape, method = _like_day(series, run, ctx)
        total = _register_total(series, run)
        if total is not None and total >= 0:
            if shape is None or sum(shape) <= 0:
                shape, method = [total / len(run)] * len(run), "flat"
            else:
                factor = total / sum(shape)
                shape = [v * factor for v in shape]
            method += "+scaled"
        if shape is None:
            continue  # nothing to estimate from: the slots stay missing or suspect
        for i, value in zip(run, shape, strict=True):
            slot = series.slots[i]
            slot.value, slot.status, slot.method = value, "estimated", method
            slot.qualities = [q for q in slot.qualities if q != Quality.MISSING]


def _interpolate(series: Series, run: list[int], ctx: Context, step: timedelta) -> tuple[list[float] | None, str]:
    if len(run) * step > ctx.cfg.interpolate_max:
        return None, ""
    first, last = run[0], run[-1]
    if first == 0 or last == len(series.slots) - 1:
        return None, ""
    before, after = series.slots[first - 1], series.slots[last + 1]
    if not (before.usable and after.usable) or in_outage(before, ctx, step) or in_outage(after, ctx, step):
        return None, ""
    assert before.value is not None and after.value is not None
    n = len(run) + 1
    return [before.value + (after.value - before.value) * k / n for k in range(1, n)], "interpolation"


def _like_day(series: Series, run: list[int], ctx: Context) -> tuple[list[float] | None, str]:
    shape: list[float] = []
    for i in run:
        t = series.slots[i].t
        earlier = [ctx.history.get(t - timedelta(weeks=w)) for w in range(1, ctx.cfg.like_day_weeks + 1)]
        seen = [h.value for h in earlier if h is not None and h.usable and h.value is not None]
        if not seen:
            return None, ""
        shape.append(mean(seen))
    return shape, "like_day"
