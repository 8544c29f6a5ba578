"""Readings to and from the compact JSON the outbox keeps, and epoch nanoseconds."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from headend.model import Reading, parse_obis

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def duration_ns(d: timedelta) -> int:
    # Exact integer arithmetic: total_seconds() goes through a float and loses microseconds.
    return (d.days * 86_400 + d.seconds) * 1_000_000_000 + d.microseconds * 1_000


def to_ns(ts: datetime) -> int:
    return duration_ns(ts - _EPOCH)


def from_ns(ns: int) -> datetime:
    return _EPOCH + timedelta(microseconds=ns // 1_000)


def reading_to_dict(r: Reading) -> dict[str, Any]:
    return {
        "k": r.kind,
        "m": r.meter,
        "c": str(r.channel),
        "t": to_ns(r.timestamp),
        "v": r.value,
        "u": r.unit,
        "r": r.raw,
        "s": r.scaler,
        "x": r.multiplier,
        "q": list(r.qualities),
        "o": r.source,
        "a": to_ns(r.collected_at),
    }


def reading_from_dict(d: dict[str, Any]) -> Reading:
    return Reading(
        kind=d["k"],
        meter=d["m"],
        channel=parse_obis(d["c"]),
        timestamp=from_ns(d["t"]),
        value=d["v"],
        unit=d["u"],
        raw=d["r"],
        scaler=d["s"],
        multiplier=d["x"],
        qualities=tuple(d["q"]),
        source=d["o"],
        collected_at=from_ns(d["a"]),
    )


def encode(r: Reading) -> str:
    # allow_nan=False: a reading that slipped past validation fails here, before acceptance.
    return json.dumps(reading_to_dict(r), ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def decode(text: str) -> Reading:
    return reading_from_dict(json.loads(text))
