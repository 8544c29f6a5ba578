"""Deterministic readings for tests and benchmarks."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from headend.model import Obis, Reading

T0 = datetime(2026, 1, 1, tzinfo=UTC)
IMPORT = Obis.parse("1-0:1.8.0.255")
PROFILE_STEP = timedelta(minutes=15)


def interval_value(meter_no: int, i: int) -> float:
    return meter_no * 1_000_000 + i + 0.25


def interval_quality(i: int) -> tuple[str, ...]:
    return ("2.0.1",) if i % 2 else ("2.0.1", "1.2.0")


def intervals(meter_no: int, start: int, stop: int, *, channel: Obis = IMPORT) -> Iterator[Reading]:
    """Readings i in [start, stop) of meter `M{meter_no:03d}`, interval end T0 + (i+1)*15 min."""
    meter = f"M{meter_no:03d}"
    for i in range(start, stop):
        yield Reading(
            meter=meter,
            channel=channel,
            timestamp=T0 + (i + 1) * PROFILE_STEP,
            value=interval_value(meter_no, i),
            raw=interval_value(meter_no, i) * 1000,
            scaler=-3,
            unit="kWh",
            qualities=interval_quality(i),
            source="test/pipeline",
            collected_at=T0,
        )
