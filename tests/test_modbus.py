"""The Modbus driver against the pymodbus-based simulator, over TCP and RTU on a real pty pair."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from headend.config import SerialLink, parse_config
from headend.localservers import free_port
from headend.model import Obis, RelayAction, RelayState
from headend.protocols.base import BadFrame, LinkDown, Refused, Timeout, Unsupported
from headend.protocols.modbus import ModbusLink
from headend.protocols.modbus_maps import MeterMap, find_map, plan_blocks, shipped_maps
from simulators.clock import ManualClock
from simulators.modbus_meter import ModbusSimulator, SimulatedMeter
from simulators.ptypair import NullModem

ROOT = Path(__file__).resolve().parent.parent
MAPS = shipped_maps()
IMPORT = Obis.parse("1-0:1.8.0.255")
START = datetime(2026, 3, 2, 6, 0, tzinfo=UTC)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def null_modem() -> Iterator[NullModem]:
    with NullModem() as modem:
        yield modem


Serve = Callable[..., AbstractAsyncContextManager[tuple[ModbusSimulator, ModbusLink]]]


@pytest.fixture(params=["tcp", "rtu"])
def serve(request: pytest.FixtureRequest, clock: ManualClock) -> Serve:
    """serve(map, units, **link_kwargs): a simulator with those units and a link to it."""

    @asynccontextmanager
    async def _serve(
        meter_map: MeterMap, units: tuple[int, ...] = (1,), **link_kwargs: Any
    ) -> AsyncIterator[tuple[ModbusSimulator, ModbusLink]]:
        sim = ModbusSimulator([SimulatedMeter(u, meter_map, clock) for u in units])
        if request.param == "tcp":
            port = free_port()
            await sim.start_tcp("127.0.0.1", port)
            link = ModbusLink.tcp("127.0.0.1", port, timeout=0.5, **link_kwargs)
        else:
            modem = request.getfixturevalue("null_modem")
            await sim.start_rtu(modem.a, 19200)
            link = ModbusLink.serial(modem.b, baudrate=19200, timeout=0.5, **link_kwargs)
        try:
            async with link:
                yield sim, link
        finally:
            await sim.stop()

    return _serve


def expected_value(sim_meter: SimulatedMeter, meter_map: MeterMap, obis: Obis, t: float) -> float:
    """What the session should report: the simulator's value, with kW turned into W."""
    value = sim_meter.expected(obis, t)
    return value * 1000 if meter_map.channel(obis).unit == "kW" else value


@pytest.mark.parametrize("name", sorted(MAPS))
async def test_every_map_decodes_the_simulators_values(serve: Serve, clock: ManualClock, name: str) -> None:
    meter_map = MAPS[name]
    async with serve(meter_map, (7,)) as (sim, link):
        clock.advance(5 * 3600 + 17)  # values move with simulated time
        session = link.session("M-7", 7, meter_map, now=clock.datetime)
        readings = await session.read_registers([c.obis for c in meter_map.channels])
        assert [r.channel for r in readings] == [c.obis for c in meter_map.channels]
        for r in readings:
            assert r.value == pytest.approx(expected_value(sim.meters[7], meter_map, r.channel, clock.now()), rel=1e-12)
            assert r.timestamp == clock.datetime() and r.kind == "register"
        energy = next(r for r in readings if r.channel == IMPORT)
        true_kwh = sim.meters[7].import_kwh(clock.now())
        assert energy.unit == "kWh"
        assert energy.value == pytest.approx(true_kwh, abs=meter_map.channel(IMPORT).scale + 0.01)
        assert sum(link.stats.requests.values()) == len(plan_blocks(meter_map, meter_map.channels))


async def test_ct_and_pt_ratios_apply_to_what_they_scale(serve: Serve, clock: ManualClock) -> None:
    m = MAPS["abb-b23"]
    async with serve(m) as (sim, link):
        session = link.session("M-1", 1, m, ct=40.0, pt=100.0, now=clock.datetime)
        energy, current, voltage, freq = await session.read_registers(
            [IMPORT, Obis.parse("1-0:31.7.0"), Obis.parse("1-0:32.7.0"), Obis.parse("1-0:14.7.0")]
        )
        t = clock.now()
        assert energy.value == pytest.approx(sim.meters[1].expected(IMPORT, t) * 4000)
        assert energy.raw == round(sim.meters[1].expected(IMPORT, t) * 100) and energy.multiplier == 4000
        assert current.value == pytest.approx(sim.meters[1].expected(current.channel, t) * 40)
        assert voltage.value == pytest.approx(sim.meters[1].expected(voltage.channel, t) * 100)
        assert freq.value == pytest.approx(sim.meters[1].expected(freq.channel, t))


async def test_three_meters_on_one_line_polled_concurrently_all_answer(serve: Serve, clock: ManualClock) -> None:
    m = MAPS["eastron-sdm630"]
    async with serve(m, (1, 2, 3)) as (sim, link):
        sessions = [link.session(f"M-{u}", u, m, now=clock.datetime) for u in (1, 2, 3)]
        for _ in range(5):
            clock.advance(900)
            results = await asyncio.gather(*(s.read_registers([IMPORT]) for s in sessions))
            for u, (energy,) in zip((1, 2, 3), results, strict=True):
                assert energy.value == pytest.approx(sim.meters[u].expected(IMPORT, clock.now()))
        assert link.stats.requests == {1: 5, 2: 5, 3: 5}
        assert not link.stats.timeouts and not link.stats.bad_frames


async def test_a_dead_unit_does_not_stall_the_others(serve: Serve, clock: ManualClock) -> None:
    m = MAPS["eastron-sdm630"]
    frozen = 1000.0  # the breaker's clock stands still: once open it stays open for this test
    async with serve(m, (1, 2, 3), breaker_threshold=2, monotonic=lambda: frozen) as (sim, link):
        sim.meters[2].faults.no_response = True
        sessions = {u: link.session(f"M-{u}", u, m, now=clock.datetime) for u in (1, 2, 3)}
        for _ in range(6):
            reads = (s.read_registers([IMPORT]) for s in sessions.values())
            results = await asyncio.gather(*reads, return_exceptions=True)
            assert not isinstance(results[0], Exception) and not isinstance(results[2], Exception)
            assert isinstance(results[1], Timeout)
        assert sim.meters[2].requests[4] == 2, "after 2 timeouts the breaker keeps unit 2 off the line"
        assert link.stats.fast_fails[2] == 4
        assert link.stats.requests[1] == link.stats.requests[3] == 6


async def test_relay_open_and_close_confirmed_by_read_back(serve: Serve, clock: ManualClock) -> None:
    m = MAPS["sim-relay-meter"]
    async with serve(m) as (_sim, link):
        session = link.session("M-1", 1, m, now=clock.datetime)
        assert await session.read_relay() == RelayState.CONNECTED
        await session.operate_relay(RelayAction.DISCONNECT)
        assert await session.read_relay() == RelayState.DISCONNECTED
        (before,) = await session.read_registers([IMPORT])
        clock.advance(3600)
        (after,) = await session.read_registers([IMPORT])
        assert after.value == before.value, "no energy flows through an open relay"
        await session.operate_relay(RelayAction.RECONNECT)
        assert await session.read_relay() == RelayState.CONNECTED
        clock.advance(3600)
        (later,) = await session.read_registers([IMPORT])
        assert later.value is not None and after.value is not None and later.value > after.value


async def test_a_stuck_relay_is_seen_in_the_read_back(serve: Serve, clock: ManualClock) -> None:
    m = MAPS["sim-relay-meter"]
    async with serve(m) as (sim, link):
        sim.meters[1].faults.stuck_relay = True
        session = link.session("M-1", 1, m, now=clock.datetime)
        await session.operate_relay(RelayAction.DISCONNECT)  # the meter acknowledges the write...
        assert await session.read_relay() == RelayState.CONNECTED  # ...but the relay did not move


async def test_maps_without_a_relay_say_so(serve: Serve) -> None:
    async with serve(MAPS["eastron-sdm630"]) as (_sim, link):
        session = link.session("M-1", 1, MAPS["eastron-sdm630"])
        with pytest.raises(Unsupported, match="has no relay"):
            await session.read_relay()
        with pytest.raises(Unsupported, match="no load profile"):
            await session.read_profile(Obis.parse("1-0:99.1.0"), START)
        with pytest.raises(Unsupported, match=r"map has no 1-0:3\.8\.0\.255"):
            await session.read_registers([Obis.parse("1-0:3.8.0")])


@pytest.mark.parametrize(
    ("code", "error"), [(1, Unsupported), (2, Unsupported), (3, Refused), (4, Timeout), (6, Timeout), (11, LinkDown)]
)
async def test_exception_responses_map_to_meter_errors(serve: Serve, code: int, error: type) -> None:
    m = MAPS["eastron-sdm630"]
    async with serve(m, (1, 2)) as (sim, link):
        sim.meters[1].faults.exception = code
        with pytest.raises(error, match=f"Modbus exception {code}"):
            await link.session("M-1", 1, m).read_registers([IMPORT])
        assert link.stats.exceptions[1] == 1
        assert (await link.session("M-2", 2, m).read_registers([IMPORT]))[0].value is not None


async def test_crc_errors_on_rtu_are_bad_frames_with_raw_bytes(null_modem: NullModem, clock: ManualClock) -> None:
    m = MAPS["abb-b23"]
    sim = ModbusSimulator([SimulatedMeter(u, m, clock) for u in (1, 2)])
    await sim.start_rtu(null_modem.a, 19200)
    sim.meters[1].faults.crc_error = True
    async with ModbusLink.serial(null_modem.b, baudrate=19200, timeout=0.3) as link:
        with pytest.raises(BadFrame, match="CRC error") as info:
            await link.session("M-1", 1, m).read_registers([IMPORT])
        assert info.value.raw[0] == 1 and len(info.value.raw) > 4
        assert link.stats.bad_frames[1] == 1
        (energy,) = await link.session("M-2", 2, m).read_registers([IMPORT])
        assert energy.value is not None
    await sim.stop()


async def test_a_slow_meter_within_the_timeout_answers_and_beyond_it_times_out(clock: ManualClock) -> None:
    m = MAPS["eastron-sdm630"]
    sim = ModbusSimulator([SimulatedMeter(1, m, clock)])
    port = free_port()
    await sim.start_tcp("127.0.0.1", port)
    async with ModbusLink.tcp("127.0.0.1", port, timeout=0.4) as link:
        sim.meters[1].faults.delay = 0.1
        assert (await link.session("M-1", 1, m).read_registers([IMPORT]))[0].value is not None
        sim.meters[1].faults.delay = 0.8
        with pytest.raises(Timeout, match="no answer from unit 1"):
            await link.session("M-1", 1, m).read_registers([IMPORT])
    await sim.stop()


async def test_no_server_is_link_down() -> None:
    link = ModbusLink.tcp("127.0.0.1", free_port(), timeout=0.3)
    with pytest.raises(LinkDown, match="cannot connect"):
        await link.connect()
    link.close()


async def test_rtu_frame_gap_follows_the_baud_rate() -> None:
    slow = ModbusLink.serial("/dev/null-not-opened", baudrate=9600, parity="E")
    fast = ModbusLink.serial("/dev/null-not-opened", baudrate=38400)
    assert slow.frame_gap == pytest.approx(3.5 * 11 / 9600)
    assert fast.frame_gap == 0.00175


async def test_a_register_relay_is_written_and_read_back(tmp_path: Path, clock: ManualClock) -> None:
    text = (ROOT / "config/meters/sim-relay-meter.toml").read_text()
    text = text.replace(
        'kind = "coil"\naddress = 0', 'kind = "register"\naddress = 0x0F00\nconnected = 0xAA\ndisconnected = 0x55'
    )
    (tmp_path / "register-relay.toml").write_text(text)
    m = find_map(str(tmp_path / "register-relay.toml"))
    assert m.relay is not None and m.relay.kind == "register"
    sim = ModbusSimulator([SimulatedMeter(1, m, clock)])
    port = free_port()
    await sim.start_tcp("127.0.0.1", port)
    async with ModbusLink.tcp("127.0.0.1", port, timeout=0.5) as link:
        session = link.session("M-1", 1, m)
        assert await session.read_relay() == RelayState.CONNECTED
        await session.operate_relay(RelayAction.DISCONNECT)
        assert await session.read_relay() == RelayState.DISCONNECTED
        assert not sim.meters[1].relay_connected
    await sim.stop()


async def test_links_and_sessions_come_from_the_config(null_modem: NullModem, clock: ManualClock) -> None:
    cfg = parse_config(
        {
            "links": [{"id": "rs485-a", "kind": "serial", "protocol": "modbus-rtu", "device": null_modem.b,
                       "baudrate": 19200, "parity": "N", "timeout": "500ms"}],
            "meters": [{"id": "SDM-2", "link": "rs485-a", "address": 2, "map": "eastron-sdm630",
                        "ct": {"primary": 100, "secondary": 5}}],
        }
    )  # fmt: skip
    meter = cfg.meters[0]
    assert meter.map is not None and meter.ct is not None
    sim = ModbusSimulator([SimulatedMeter(2, MAPS["eastron-sdm630"], clock)])
    await sim.start_rtu(null_modem.a, 19200)
    link_cfg = cfg.links[0]
    assert isinstance(link_cfg, SerialLink)
    async with ModbusLink.from_config(link_cfg) as link:
        session = link.session(meter.id, int(meter.address or 0), find_map(meter.map), ct=meter.ct.factor)
        (energy,) = await session.read_registers([IMPORT])
        assert energy.value == pytest.approx(sim.meters[2].expected(IMPORT, clock.now()) * 20)
        assert energy.source == "modbus/rs485-a/2"
    await sim.stop()


async def test_the_simulator_runs_as_its_own_process() -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "simulators.modbus_meter", "--map", "abb-b23", "--units", "1-3",
        "--tcp", f"127.0.0.1:{port}", cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert b"ABB B23 units 1-3 on tcp" in await proc.stdout.readline()  # printed once it listens
        async with ModbusLink.tcp("127.0.0.1", port, timeout=1.0) as link:
            for unit in (1, 2, 3):
                assert await link.session(f"M-{unit}", unit, MAPS["abb-b23"]).read_serial() == 70_000_000 + unit
    finally:
        proc.terminate()
        await proc.wait()
