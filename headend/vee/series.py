"""One meter's billing intervals over a period, built from whatever the meter gives.

A DLMS load profile records the energy *register* at each interval end (cumulative); a
concentrator or the Modbus boundary reader delivers the energy *of* each interval (delta).
VEE works on one shape: a slot per expected interval end with the energy consumed in it
(kWh, primary side after CT/PT) and, where known, the register at its end. From a
cumulative source a slot's energy is the difference of two registers, so a missing register
leaves two slots without a value (and the register on both sides bounds their sum).

The slots are columns (numpy arrays), not an object per interval: a month with its
like-day history is some 5,600 slots, and validating it is a handful of array operations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import numpy as np
from numpy.typing import NDArray

from headend.model import Quality
from headend.storage.codec import duration_ns, to_ns
from headend.storage.columns import Columns
from headend.timegrid import ceil_ns, floor_to

Times = NDArray[np.int64]
Floats = NDArray[np.float64]
Mask = NDArray[np.bool_]

ACTUAL, SUSPECT, MISSING, ESTIMATED, EDITED = range(5)
STATUS = ("actual", "suspect", "missing", "estimated", "edited")
_MISSING = Quality.MISSING.value


@dataclass(frozen=True)
class Exchange:
    """A meter exchange or a CT/PT change at `t`: the register restarts from `baseline`
    (meter side, kWh) and, from then on, counts with `multiplier`."""

    t: datetime
    baseline: float
    multiplier: float


class Qualities:
    """The distinct quality tuples of a series, numbered: a slot keeps its tuple's number."""

    def __init__(self) -> None:
        self.tuples: list[tuple[str, ...]] = [()]
        self._numbers: dict[tuple[str, ...], int] = {(): 0}
        self._texts: dict[str, int] = {"": 0}

    def number(self, qualities: tuple[str, ...]) -> int:
        n = self._numbers.get(qualities)
        if n is None:
            n = self._numbers[qualities] = len(self.tuples)
            self.tuples.append(qualities)
        return n

    def of_texts(self, texts: NDArray[np.object_]) -> NDArray[np.intp]:
        """Numbers of stored quality texts (codes joined by ","); most slots have none."""
        out = np.zeros(len(texts), np.intp)
        coded = np.flatnonzero(texts != "")
        numbers = self._texts
        for i, text in zip(coded.tolist(), texts[coded].tolist(), strict=True):
            if (n := numbers.get(text)) is None:
                n = numbers[text] = self.number(tuple(text.split(",")))
            out[i] = n
        return out

    def mapped(self, numbers: NDArray[np.intp], change: Callable[[tuple[str, ...]], tuple[str, ...]],
               ) -> NDArray[np.intp]:  # fmt: skip
        """The numbers of `change(qualities)` for each of `numbers`."""
        table = np.array([self.number(change(q)) for q in list(self.tuples)], dtype=np.intp)
        return table[numbers]

    def test(self, numbers: NDArray[np.intp], predicate: Callable[[tuple[str, ...]], bool]) -> Mask:
        table = np.array([predicate(q) for q in self.tuples], dtype=np.bool_)
        return table[numbers]


def without_missing(qualities: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(q for q in qualities if q != _MISSING)


@dataclass
class Series:
    meter: str
    start: datetime  # exclusive
    end: datetime  # inclusive
    step: timedelta
    t: Times  # interval ends, UTC epoch ns, one step apart
    value: Floats  # kWh in the interval, primary side; NaN: not known
    register: Floats  # the energy register at t (primary side), NaN where the source gives none
    multiplier: Floats
    quality: NDArray[np.intp]  # a number in `qualities` per slot
    qualities: Qualities
    cumulative: bool
    flags: NDArray[np.int32]  # a bit for each rule the slot failed (rules.BITS)
    status: NDArray[np.int8]  # ACTUAL, SUSPECT, MISSING, ESTIMATED, EDITED
    method: NDArray[np.object_]  # how an estimated slot was estimated
    conflicted: Mask  # the interval was given two different values
    misaligned: Mask  # readings stamped off the interval grid fell into it
    rollover: Mask  # the register wrapped round its dials in it
    #: Register reads (primary side) inside or around the period: times (ns) and kWh.
    registers: tuple[Times, Floats]

    def __len__(self) -> int:
        return len(self.t)

    @property
    def step_ns(self) -> int:
        return duration_ns(self.step)

    def usable(self) -> Mask:
        """Actual values no rule has failed: what estimation may lean on."""
        return ~np.isnan(self.value) & (self.status == ACTUAL) & (self.flags == 0)

    def position(self, t: int) -> int | None:
        """The slot of interval end `t` (ns), if the series has it."""
        if not len(self.t):
            return None
        k, off = divmod(t - int(self.t[0]), self.step_ns)
        return k if off == 0 and 0 <= k < len(self.t) else None

    def period(self, start: datetime, end: datetime) -> Series:
        """The slots after `start`, sharing their arrays with this series (what is flagged on
        one is flagged on the other), with the register reads around (start, end]."""
        first = int(np.searchsorted(self.t, to_ns(start), side="right"))
        rt, rv = self.registers
        near = (rt >= to_ns(start - self.step)) & (rt <= to_ns(end + self.step))
        return replace(self, start=start, end=end, t=self.t[first:], value=self.value[first:],
                       register=self.register[first:], multiplier=self.multiplier[first:],
                       quality=self.quality[first:], flags=self.flags[first:], status=self.status[first:],
                       method=self.method[first:], conflicted=self.conflicted[first:],
                       misaligned=self.misaligned[first:], rollover=self.rollover[first:],
                       registers=(rt[near], rv[near]))  # fmt: skip


def grid(start: datetime, end: datetime, step: timedelta) -> Times:
    """The interval ends in (start, end], as epoch ns."""
    first = floor_to(start, step) + step
    n = (end - first) // step + 1 if end >= first else 0
    return to_ns(first) + duration_ns(step) * np.arange(n, dtype=np.int64)


@dataclass
class _Placed:
    """Readings put on a grid of interval ends: the last one with a value for each end."""

    has: Mask
    value: Floats
    multiplier: Floats
    quality: NDArray[np.intp]
    conflicted: Mask  # two different values for one end
    misaligned: Mask  # a stamp off the grid fell into the interval


def _place(columns: Columns, t: Times, step_ns: int, qualities: Qualities) -> _Placed:
    n = len(t)
    placed = _Placed(np.zeros(n, np.bool_), np.full(n, np.nan), np.ones(n), np.zeros(n, np.intp),
                     np.zeros(n, np.bool_), np.zeros(n, np.bool_))  # fmt: skip
    if not len(columns) or not n:
        return placed
    ts = columns.ts
    ends = ceil_ns(ts, step_ns)  # the interval end each stamp falls in
    slot = (ends - t[0]) // step_ns
    inside = (slot >= 0) & (slot < n)
    placed.misaligned[slot[inside & (ts != ends)]] = True
    chosen = np.flatnonzero(inside & (ts == ends) & ~np.isnan(columns.value))
    if not len(chosen):
        return placed
    slots = slot[chosen]
    # Stamps are in order: of several values for one end, the last is the one a store keeps.
    last = np.ones(len(chosen), np.bool_)
    last[:-1] = slots[1:] != slots[:-1]
    for k in np.flatnonzero(~last):  # rare: two readings for one interval (not from a store)
        same = columns.value[chosen[slots == slots[k]]]
        if len(np.unique(same)) > 1:
            placed.conflicted[slots[k]] = True
    picked, where = chosen[last], slots[last]
    placed.has[where] = True
    placed.value[where] = columns.value[picked]
    placed.multiplier[where] = columns.multiplier[picked]
    placed.quality[where] = qualities.of_texts(columns.quality[picked])
    return placed


def build(
    meter: str,
    start: datetime,
    end: datetime,
    step: timedelta,
    *,
    cumulative: Columns | None = None,
    deltas: Columns | None = None,
    registers: Columns | None = None,
    exchanges: list[Exchange] | None = None,
    register_modulus: float | None = None,
    conflicts: dict[datetime, list[float]] | None = None,
) -> Series:
    """Slots for every interval end in (start, end]. `cumulative` readings must reach one
    interval before `start` so the first slot has a value. `register_modulus` (meter side,
    10**digits) tells a rollover from a rollback."""
    t = grid(start, end, step)
    n, step_ns = len(t), duration_ns(step)
    qualities = Qualities()
    missing = qualities.number((_MISSING,))
    rollover = np.zeros(n, np.bool_)
    register = np.full(n, np.nan)
    reads = registers if registers is not None else Columns.empty()
    known = ~np.isnan(reads.value)
    reg_t, reg_v = reads.ts[known], reads.value[known]
    if cumulative is not None:
        first = t[0] - step_ns if n else to_ns(start)
        placed = _place(cumulative, np.concatenate(([first], t)), step_ns, qualities)
        has, previous = placed.has[1:], placed.has[:-1]
        cur, before = placed.value[1:], placed.value[:-1]
        value = cur - before
        mult = np.where(has, placed.multiplier[1:], 1.0)
        if register_modulus:
            wrapped = (value < 0) & (-value > register_modulus * mult / 2)
            value[wrapped] += register_modulus * mult[wrapped]
            rollover = wrapped & has & previous
        exchanged = np.zeros(n, np.bool_)
        for x in sorted(exchanges or [], key=lambda x: x.t):
            k = ceil_ns(to_ns(x.t), step_ns)  # the first exchange in an interval counts
            if n and 0 <= (i := (k - int(t[0])) // step_ns) < n and not exchanged[i]:
                exchanged[i] = True
                value[i] = cur[i] - x.baseline * x.multiplier
        value[~has | ~(previous | exchanged)] = np.nan
        rollover &= ~exchanged
        quality = qualities.mapped(placed.quality[1:], without_missing)
        # A register with none before it: the slot's value is unknown, its qualities sorted.
        alone = has & ~previous & ~exchanged
        quality[alone] = qualities.mapped(quality[alone], lambda q: tuple(sorted({*q, _MISSING})))
        quality[~has] = missing
        register = np.where(has, cur, np.nan)
        conflicted, misaligned = placed.conflicted[1:], placed.misaligned[1:]
        reg_t = np.concatenate((reg_t, t[has]))
        reg_v = np.concatenate((reg_v, cur[has]))
        order = np.lexsort((reg_v, reg_t))
        reg_t, reg_v = reg_t[order], reg_v[order]
    else:
        placed = _place(deltas if deltas is not None else Columns.empty(), t, step_ns, qualities)
        has = placed.has
        value, mult, quality = placed.value, placed.multiplier, placed.quality
        quality[~has] = missing
        conflicted, misaligned = placed.conflicted, placed.misaligned
    series = Series(meter, start, end, step, t, value, register, mult, quality, qualities, cumulative is not None,
                    np.zeros(n, np.int32), np.where(np.isnan(value), MISSING, ACTUAL).astype(np.int8),
                    np.full(n, None, dtype=object), conflicted, misaligned, rollover, (reg_t, reg_v))  # fmt: skip
    # Values that were replaced in the store by a different one for the same interval (VEE
    # noted them on arrival): the interval has two answers; from a cumulative source the
    # register is shared with the next interval, so both are in doubt.
    for at in conflicts or {}:
        for u in (to_ns(at), to_ns(at) + step_ns) if series.cumulative else (to_ns(at),):
            if (i := series.position(u)) is not None:
                conflicted[i] = True
    return series
