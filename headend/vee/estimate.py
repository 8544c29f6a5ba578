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

import numpy as np

from headend.storage.codec import duration_ns, to_ns
from headend.vee.rules import BITS, HARD_BITS, Context, in_outage, runs_of
from headend.vee.series import ACTUAL, ESTIMATED, Mask, Series, without_missing

WEEK = timedelta(weeks=1)


def needs_estimate(series: Series) -> Mask:
    return np.isnan(series.value) | ((series.flags & HARD_BITS) != 0)


def runs(series: Series) -> list[tuple[int, int]]:
    """[first, last] of each run of slots that need an estimate."""
    return runs_of(needs_estimate(series))


def _usable(series: Series, i: int) -> bool:
    return series.value[i] == series.value[i] and series.status[i] == ACTUAL and series.flags[i] == 0


def _register_total(series: Series, first: int, last: int) -> float | None:
    """Register difference across the run, from the registers at the slot before and the last slot."""
    if not series.cumulative or first == 0:
        return None
    before, end = float(series.register[first - 1]), float(series.register[last])
    if before != before or end != end:
        return None
    # A hard-failed slot's own register may be the faulty one (a rollback): the run then
    # has no trustworthy total.
    run = slice(first, last + 1)
    if ((series.flags[run] & BITS["rollback"]) != 0).any() or series.conflicted[run].any():
        return None
    return end - before


def estimate(series: Series, ctx: Context, *, after: datetime | None = None) -> None:
    """Estimate every run of unusable slots (only those reaching past `after`, if given)."""
    after_ns = to_ns(after) if after is not None else None
    outage = in_outage(series, ctx)
    for first, last in runs(series):
        if after_ns is not None and series.t[last] <= after_ns:
            continue
        shape, method = _interpolate(series, first, last, ctx, outage)
        if shape is None:
            shape, method = _like_day(series, first, last, ctx)
        total = _register_total(series, first, last)
        if total is not None and total >= 0:
            n = last - first + 1
            if shape is None or sum(shape) <= 0:
                shape, method = [total / n] * n, "flat"
            else:
                factor = total / sum(shape)
                shape = [v * factor for v in shape]
            method += "+scaled"
        if shape is None:
            continue  # nothing to estimate from: the slots stay missing or suspect
        run = slice(first, last + 1)
        series.value[run] = shape
        series.status[run] = ESTIMATED
        series.method[run] = method
        series.quality[run] = series.qualities.mapped(series.quality[run], without_missing)


def _interpolate(series: Series, first: int, last: int, ctx: Context,
                 outage: Mask) -> tuple[list[float] | None, str]:  # fmt: skip
    n = last - first + 2
    if (n - 1) * series.step > ctx.cfg.interpolate_max:
        return None, ""
    if first == 0 or last == len(series) - 1:
        return None, ""
    before, after = first - 1, last + 1
    if not (_usable(series, before) and _usable(series, after)) or outage[before] or outage[after]:
        return None, ""
    a, b = float(series.value[before]), float(series.value[after])
    return [a + (b - a) * k / n for k in range(1, n)], "interpolation"


def _like_day(series: Series, first: int, last: int, ctx: Context) -> tuple[list[float] | None, str]:
    history = ctx.history
    if history is None:
        return None, ""
    week = duration_ns(WEEK)
    shape: list[float] = []
    for t in series.t[first : last + 1].tolist():
        seen = []
        for w in range(1, ctx.cfg.like_day_weeks + 1):
            j = history.position(t - w * week)
            if j is not None and _usable(history, j):
                seen.append(float(history.value[j]))
        if not seen:
            return None, ""
        shape.append(mean(seen))
    return shape, "like_day"
