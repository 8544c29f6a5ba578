"""One meter's billing intervals over a period, built from whatever the meter gives.

A DLMS load profile records the energy *register* at each interval end (cumulative); a
concentrator or the Modbus boundary reader delivers the energy *of* each interval (delta).
VEE works on one shape: a slot per expected interval end with the energy consumed in it
(kWh, primary side after CT/PT) and, where known, the register at its end. From a
cumulative source a slot's energy is the difference of two registers, so a missing register
leaves two slots without a value (and the register on both sides bounds their sum).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from headend.model import Quality, Reading
from headend.timegrid import ceil_to, floor_to


@dataclass(frozen=True)
class Exchange:
    """A meter exchange or a CT/PT change at `t`: the register restarts from `baseline`
    (meter side, kWh) and, from then on, counts with `multiplier`."""

    t: datetime
    baseline: float
    multiplier: float


@dataclass
class Slot:
    t: datetime  # interval end, UTC
    value: float | None = None  # kWh in the interval, primary side; None: not known
    qualities: list[str] = field(default_factory=list)
    multiplier: float = 1.0
    #: The energy register at t (primary side), when the source gives it.
    register: float | None = None
    #: rule name -> quality code of every rule this slot failed
    flags: dict[str, str] = field(default_factory=dict)
    status: str = "actual"  # actual | suspect | missing | estimated | edited
    version: int = 0
    method: str | None = None
    #: Set by the builder: the values seen for this interval when they disagreed.
    conflicts: list[float] = field(default_factory=list)
    #: Set by the builder: readings stamped off the interval grid that fell into this slot.
    misaligned: list[datetime] = field(default_factory=list)
    rollover: bool = False

    @property
    def usable(self) -> bool:
        """An actual value no rule has failed: what estimation may lean on."""
        return self.value is not None and self.status == "actual" and not self.flags


@dataclass
class Series:
    meter: str
    start: datetime  # exclusive
    end: datetime  # inclusive
    step: timedelta
    slots: list[Slot]
    cumulative: bool
    #: Register reads (primary side) inside or around the period: (time, kWh).
    registers: list[tuple[datetime, float]] = field(default_factory=list)

    def index(self) -> dict[datetime, Slot]:
        return {s.t: s for s in self.slots}


def grid(start: datetime, end: datetime, step: timedelta) -> list[datetime]:
    first = floor_to(start, step) + step
    n = (end - first) // step + 1 if end >= first else 0
    return [first + k * step for k in range(n)]


OnGrid = dict[datetime, list[Reading]]
OffGrid = dict[datetime, list[datetime]]


def _group(readings: list[Reading], step: timedelta) -> tuple[OnGrid, OffGrid]:
    """Readings by the interval end they belong to; off-grid stamps are kept apart."""
    on: OnGrid = {}
    off: OffGrid = {}
    for r in readings:
        end = ceil_to(r.timestamp, step)
        if r.timestamp != end:
            off.setdefault(end, []).append(r.timestamp)
            continue
        on.setdefault(end, []).append(r)
    return on, off


def _pick(slot: Slot, candidates: list[Reading]) -> Reading | None:
    values = [r for r in candidates if r.value is not None]
    if not values:
        return None
    distinct = sorted({r.value for r in values if r.value is not None})
    if len(distinct) > 1:
        slot.conflicts = distinct
    return values[-1]  # the last one written is the one the store keeps


def build(
    meter: str,
    start: datetime,
    end: datetime,
    step: timedelta,
    *,
    cumulative: list[Reading] | None = None,
    deltas: list[Reading] | None = None,
    registers: list[Reading] | None = None,
    exchanges: list[Exchange] | None = None,
    register_modulus: float | None = None,
    conflicts: dict[datetime, list[float]] | None = None,
) -> Series:
    """Slots for every interval end in (start, end]. `cumulative` readings must reach one
    interval before `start` so the first slot has a value. `register_modulus` (meter side,
    10**digits) tells a rollover from a rollback."""
    ends = grid(start, end, step)
    slots = [Slot(t) for t in ends]
    exchanges = sorted(exchanges or [], key=lambda x: x.t)
    series = Series(meter, start, end, step, slots, cumulative=cumulative is not None)
    series.registers = [(r.timestamp, r.value) for r in registers or [] if r.value is not None]
    if cumulative is not None:
        on, off = _group(cumulative, step)
        previous_t = ends[0] - step if ends else start
        previous = _pick(Slot(previous_t), on.get(previous_t, []))
        for slot in slots:
            slot.misaligned = off.get(slot.t, [])
            reading = _pick(slot, on.get(slot.t, []))
            exchange = next((x for x in exchanges if previous_t < x.t <= slot.t), None)
            if reading is not None:
                slot.qualities = [q for q in reading.qualities if q != Quality.MISSING]
                slot.multiplier = reading.multiplier
                slot.register = reading.value
            if reading is None or reading.value is None:
                slot.qualities = sorted({*slot.qualities, Quality.MISSING})
            elif exchange is not None:
                slot.value = reading.value - exchange.baseline * exchange.multiplier
            elif previous is not None and previous.value is not None:
                delta = reading.value - previous.value
                if delta < 0 and register_modulus and -delta > register_modulus * reading.multiplier / 2:
                    delta += register_modulus * reading.multiplier
                    slot.rollover = True
                slot.value = delta
            else:
                slot.qualities = sorted({*slot.qualities, Quality.MISSING})
            if slot.value is None and Quality.MISSING not in slot.qualities:
                slot.qualities.append(Quality.MISSING)
            previous, previous_t = reading, slot.t
        series.registers += [(s.t, s.register) for s in slots if s.register is not None]
        series.registers.sort()
    else:
        on, off = _group(deltas or [], step)
        for slot in slots:
            slot.misaligned = off.get(slot.t, [])
            reading = _pick(slot, on.get(slot.t, []))
            if reading is None:
                slot.qualities = [Quality.MISSING]
                continue
            slot.qualities = list(reading.qualities)
            slot.multiplier = reading.multiplier
            slot.value = reading.value
    # Values that were replaced in the store by a different one for the same interval (VEE
    # noted them on arrival): the interval has two answers; from a cumulative source the
    # register is shared with the next interval, so both are in doubt.
    index = series.index()
    for t, values in (conflicts or {}).items():
        doubtful = [t, t + step] if series.cumulative else [t]
        for u in doubtful:
            if (slot := index.get(u)) is not None:
                current = slot.register if series.cumulative else slot.value
                slot.conflicts = sorted({*slot.conflicts, *values, *([] if current is None else [current])})
    for slot in slots:
        if slot.value is None:
            slot.status = "missing"
    return series
