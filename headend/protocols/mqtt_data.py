"""Data messages decoded straight into series: the hot path of concentrator ingest.

`mqtt_schema.Data` (pydantic) documents the message and builds it (the simulator); decoding
100,000 values a second through it and one Reading per value cost 30 µs a value. Here msgspec
decodes the same JSON into typed structs (the same limits, stricter types: numbers must be
JSON numbers, times RFC 3339 strings with an offset), and each block is checked once as a
block (meter, channel, unit, source) and per value only for what varies (time in range, a
finite value, known quality codes). tests/test_mqtt_data.py holds the two to the same
answers: what this accepts, the pydantic model accepts, with the same readings.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from functools import lru_cache
from typing import Annotated, Literal

import msgspec

from headend.model import (
    Obis,
    Quality,
    exact_product,
    parse_obis,
    printable,
    validate_meter_id,
    validate_quality_code,
)
from headend.protocols.mqtt_schema import EARLIEST, LATEST, MAX_POINTS, MAX_SEQ
from headend.storage.codec import to_ns
from headend.storage.series import Series

_NAME = msgspec.Meta(max_length=64)
_EARLIEST_NS, _LATEST_NS = to_ns(EARLIEST), to_ns(LATEST)
_MISSING = Quality.MISSING.value


class DataPoint(msgspec.Struct, forbid_unknown_fields=True):
    t: Annotated[datetime, msgspec.Meta(tz=True)]
    v: float | None
    q: Annotated[list[Annotated[str, msgspec.Meta(max_length=16)]], msgspec.Meta(max_length=8)] = []
    raw: float | None = None
    scaler: int = 0


class DataBlock(msgspec.Struct, forbid_unknown_fields=True):
    meter: Annotated[str, _NAME]
    kind: Literal["interval", "register", "event"]
    channel: Annotated[str, msgspec.Meta(max_length=40)]
    readings: Annotated[list[DataPoint], msgspec.Meta(min_length=1, max_length=10_000)]
    unit: Annotated[str, msgspec.Meta(max_length=16)] = ""
    interval_s: Annotated[int, msgspec.Meta(gt=0)] | None = None


class DataMessage(msgspec.Struct, forbid_unknown_fields=True):
    seq: Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)]
    blocks: Annotated[list[DataBlock], msgspec.Meta(min_length=1, max_length=10_000)]
    replay: bool = False


_decoder = msgspec.json.Decoder(DataMessage)


#: A time with more than microseconds: msgspec would round it, pydantic truncate; refused.
_SUB_MICROSECOND = re.compile(rb"\d\d:\d\d:\d\d\.\d{7}")
#: Its tail, which starts with a literal the regex engine finds fast: searching a message for
#: the whole pattern took 1.3 µs a value, more than decoding it.
_SUB_MICROSECOND_TAIL = re.compile(rb":\d\d\.\d{7}")


def _sub_microsecond(payload: bytes) -> bool:
    return any(_SUB_MICROSECOND.match(payload, max(0, m.start() - 5)) for m in _SUB_MICROSECOND_TAIL.finditer(payload))


def decode(payload: bytes) -> DataMessage:
    """The message, or ValueError naming what is wrong with it."""
    if _sub_microsecond(payload):
        raise ValueError("a time with more than 6 decimals of a second (at most microseconds)")
    try:
        data = _decoder.decode(payload)
    except msgspec.DecodeError as exc:  # ValidationError included
        raise ValueError(str(exc)) from None
    points = sum(len(b.readings) for b in data.blocks)
    if points > MAX_POINTS:
        raise ValueError(f"{points} points in one message; at most {MAX_POINTS}")
    return data


@lru_cache(maxsize=256)
def _quality(codes: tuple[str, ...]) -> str:
    for code in codes:
        validate_quality_code(code)
    return ",".join(codes)


@lru_cache(maxsize=1 << 17)
def _block_keys(meter: str, channel: str, unit: str) -> tuple[str, Obis]:
    """Checked once per meter, channel and unit (ValueError says which is wrong)."""
    validate_meter_id(meter)
    if not printable(unit):
        raise ValueError(f"unit {unit!r} has control characters")
    return meter, parse_obis(channel)


#: A block's checked columns: (kind, meter, channel, unit, multiplier) and times, values,
#: raws, scalers and qualities.
Part = tuple[str, str, Obis, str, float, list[int], list[float | None], list[float | None], list[int], list[str]]


def part_of(block: DataBlock, multiplier: float) -> Part:
    """A block's columns, every value checked as a Reading would check it (ValueError)."""
    meter, channel = _block_keys(block.meter, block.channel, block.unit)
    n = len(block.readings)
    times: list[int] = [0] * n
    values: list[float | None] = [None] * n
    raws: list[float | None] = [None] * n
    scalers: list[int] = [0] * n
    qualities: list[str] = [""] * n
    for i, p in enumerate(block.readings):
        t = to_ns(p.t)  # exact integer arithmetic whatever the offset (no UTC datetime needed)
        if not _EARLIEST_NS <= t <= _LATEST_NS:
            raise ValueError(f"{p.t.isoformat()} is outside {EARLIEST.year}..{LATEST.year}")
        v, raw = p.v, p.raw
        q = _quality(tuple(p.q)) if p.q else ""
        if v is None:
            if _MISSING not in p.q:
                raise ValueError(f"{meter} {channel} at {p.t.isoformat()} has no value but is not marked missing "
                                 f"({_MISSING})")  # fmt: skip
        elif not math.isfinite(v):
            raise ValueError(f"{meter} {channel} at {p.t.isoformat()}: value {v!r} is not a finite number")
        elif multiplier != 1.0:
            v = exact_product(v, multiplier)
            if not math.isfinite(v):
                raise ValueError(f"{meter} {channel} at {p.t.isoformat()}: value x multiplier is out of range")
        if raw is not None and not math.isfinite(raw):
            raise ValueError(f"{meter} {channel} at {p.t.isoformat()}: raw {raw!r} is not a finite number")
        if not -128 <= p.scaler <= 127:
            raise ValueError(f"scaler must be an integer -128..127, got {p.scaler!r}")
        times[i], values[i], raws[i], scalers[i], qualities[i] = t, v, raw, p.scaler, q
    return block.kind, meter, channel, block.unit, multiplier, times, values, raws, scalers, qualities


class SeriesBuilder:
    """The blocks of many messages joined into one series per meter and channel: a backlog's
    hundred messages of one interval each become one series per meter, not a hundred (the
    outbox, the line protocol and VEE all pay per series). Points keep their arrival order,
    so a value sent twice is stored as sent last."""

    def __init__(self, collected_ns: int) -> None:
        self.collected_ns = collected_ns
        self._all: list[Series] = []
        #: The open series of each (kind, meter, channel): a block with another unit, source or
        #: multiplier starts a new one after it, so the order of arrival is kept.
        self._open: dict[tuple[str, str, Obis], Series] = {}

    def add(self, parts: list[Part], source: str) -> None:
        for kind, meter, channel, unit, multiplier, times, values, raws, scalers, qualities in parts:
            key = (kind, meter, channel)
            s = self._open.get(key)
            if s is None or (s.unit, s.source, s.multiplier) != (unit, source, multiplier):
                s = Series(kind, meter, channel, unit, source, multiplier, times, values,  # type: ignore[arg-type]
                           raws, scalers, qualities, [self.collected_ns] * len(times))  # fmt: skip
                self._open[key] = s
                self._all.append(s)
            else:
                s.times.extend(times)
                s.values.extend(values)
                s.raws.extend(raws)
                s.scalers.extend(scalers)
                s.qualities.extend(qualities)
                s.collected.extend([self.collected_ns] * len(times))

    def series(self) -> list[Series]:
        return list(self._all)

