"""Interval reads built from energy registers polled at boundaries; a missed boundary is marked."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from headend.localservers import free_port
from headend.model import Obis, Quality, Reading
from headend.protocols.modbus import ModbusLink
from headend.protocols.modbus_intervals import build_intervals
from headend.protocols.modbus_maps import shipped_maps
from headend.timegrid import boundary_read_of
from simulators.clock import ManualClock
from simulators.modbus_meter import ModbusSimulator, SimulatedMeter

IMPORT = Obis.parse("1-0:1.8.0.255")
STEP = timedelta(minutes=15)
TOL = timedelta(seconds=60)
T0 = datetime(2026, 3, 2, 0, 0, tzinfo=UTC)


def test_a_read_stands_for_a_boundary_only_at_or_after_it_within_tolerance() -> None:
    assert boundary_read_of(T0, STEP, TOL) == T0
    assert boundary_read_of(T0 + timedelta(seconds=20), STEP, TOL) == T0
    assert boundary_read_of(T0 - timedelta(seconds=30), STEP, TOL) is None, "before it: the energy up to then only"
    assert boundary_read_of(T0 + timedelta(minutes=3), STEP, TOL) is None


async def test_missed_and_late_boundaries_mark_intervals_missing_never_smeared() -> None:
    m = shipped_maps()["eastron-sdm630"]
    clock = ManualClock(T0 - timedelta(minutes=1))
    sim = ModbusSimulator([SimulatedMeter(1, m, clock)])
    port = free_port()
    await sim.start_tcp("127.0.0.1", port)
    reads: list[Reading] = []
    async with ModbusLink.tcp("127.0.0.1", port, timeout=0.5) as link:
        session = link.session("M-1", 1, m, now=clock.datetime)
        # Boundaries 00:00 .. 01:30. 00:30 is missed (no poll); 01:00 is polled 4 minutes late.
        for k in range(7):
            boundary = T0 + k * STEP
            if k == 2:
                continue
            clock.set(boundary + (timedelta(minutes=4) if k == 4 else timedelta(seconds=12)))
            reads += await session.read_registers([IMPORT])
    await sim.stop()

    intervals = build_intervals("M-1", IMPORT, reads, T0, T0 + 6 * STEP, STEP, TOL)
    assert [r.timestamp for r in intervals] == [T0 + k * STEP for k in range(1, 7)]
    missing = [r.timestamp for r in intervals if r.value is None]
    # 00:30 missed -> intervals ending 00:30 and 00:45 unknown; 01:00 late -> 01:00 and 01:15 unknown.
    assert missing == [T0 + 2 * STEP, T0 + 3 * STEP, T0 + 4 * STEP, T0 + 5 * STEP]
    assert all(r.qualities == (Quality.MISSING,) for r in intervals if r.value is None)
    good = {r.timestamp: r.value for r in intervals if r.value is not None}
    by_boundary = {boundary_read_of(r.timestamp, STEP, TOL): r.value for r in reads}
    for end, value in good.items():
        assert value == pytest.approx(by_boundary[end] - by_boundary[end - STEP])
        assert value > 0
    # The register reads on both sides of the gap stay, so VEE knows the gap's exact total.
    assert by_boundary[T0 + 3 * STEP] is not None and by_boundary[T0 + STEP] is not None
