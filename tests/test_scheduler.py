"""The polling engine over simulated DLMS meters: plans, links, completeness, clocks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from headend.config import Config, Plan, parse_config
from headend.localservers import free_port
from headend.model import EVENT_LOG, Obis, Quality
from headend.protocols.dlms.client import DlmsSession
from headend.protocols.modbus import ModbusLink
from headend.protocols.modbus_maps import shipped_maps
from headend.registry import Registry
from headend.scheduler.engine import PollingEngine
from headend.scheduler.gate import Lane, LinkGate
from headend.scheduler.loop import PlanLoop
from headend.storage.outbox import Outbox
from simulators.clock import ManualClock
from simulators.dlms_meter import SimulatedDlmsMeter
from simulators.modbus_meter import ModbusSimulator, SimulatedMeter

NOW = datetime(2026, 3, 9, 10, 0, 40, tzinfo=UTC)
STEP = timedelta(minutes=15)
LAST = datetime(2026, 3, 9, 10, 0, tzinfo=UTC)


@dataclass
class Fleet:
    config: Config
    meters: dict[str, SimulatedDlmsMeter]
    ports: dict[str, int]
    outbox: Outbox
    clock: ManualClock

    def engine(self, **kwargs: object) -> PollingEngine:
        def session(m: str) -> DlmsSession:
            return DlmsSession.tcp_wrapper("127.0.0.1", self.ports[m], m, authentication="lls",
                                           password=b"12345678", timeout=1, now=self.clock.datetime)  # fmt: skip

        async def no_wait(_seconds: float) -> None:
            return None  # retries without real waiting: backoff timing is not what these tests check

        return PollingEngine(Registry(self.config), self.outbox, session, sleep=no_wait,  # type: ignore[arg-type]
                             clock=self.clock.datetime, **kwargs)  # fmt: skip

    def plan(self, **overrides: object) -> Plan:
        base = {"id": "lp", "read": ["clock", "profile", "registers"], "channels": ["1-0:1.8.0.255"],
                "every": "15m", "history": "6h", "select": {"group": "fleet"}}  # fmt: skip
        return parse_config({**fleet_config(self.ports), "plans": [{**base, **overrides}]}).plans[0]


def fleet_config(ports: dict[str, int]) -> dict[str, object]:
    """One direct TCP-wrapper link per meter, all in group `fleet`."""
    return {
        "links": [{"id": f"tcp-{m}", "kind": "tcp", "protocol": "dlms-wrapper", "host": "127.0.0.1", "port": p}
                  for m, p in ports.items()],
        "meters": [{"id": m, "link": f"tcp-{m}", "groups": ["fleet"]} for m in ports],
    }  # fmt: skip


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    clock = ManualClock(NOW)
    meters = {f"M{i}": SimulatedDlmsMeter(f"M{i}", clock, seed=i + 1) for i in range(5)}
    ports = {m: await sim.start() for m, sim in meters.items()}
    ports["DEAD"] = free_port()  # nothing listens there: a meter whose link is down
    outbox = Outbox(tmp_path / "outbox.sqlite")
    yield Fleet(parse_config(fleet_config(ports)), meters, ports, outbox, clock)
    outbox.close()
    for sim in meters.values():
        await sim.stop()


async def test_a_plan_reads_the_fleet_and_a_dead_link_does_not_stall_it(fleet: Fleet) -> None:
    engine = fleet.engine(breaker_threshold=2)
    report = await engine.run_plan(fleet.plan(), NOW)
    by_meter = {r.meter: r for r in report.results}
    for m in fleet.meters:
        r = by_meter[m]
        assert r.ok and r.expected_intervals == 24 and r.completeness == 1.0
        assert r.readings == 24 * 4 + 1  # six hours of four channels, and the register
    dead = by_meter["DEAD"]
    assert not dead.ok and "circuit open" in dead.error and dead.attempts == 2  # the third was not tried
    assert engine.breakers["tcp-DEAD"].state() == "open"
    assert report.succeeded == 5
    assert fleet.outbox.depth() == 5 * (24 * 4 + 1)


async def test_the_next_run_reads_from_where_the_last_complete_interval_is(fleet: Fleet) -> None:
    engine = fleet.engine()
    plan = fleet.plan(read=["profile"], select={"meters": ["M0"]})
    gap = LAST - 2 * STEP
    fleet.meters["M0"].faults.missing_intervals = {gap}
    first = (await engine.run_plan(plan, NOW)).results[0]
    assert first.missing == (gap,) and first.completeness == pytest.approx(23 / 24)
    fleet.meters["M0"].faults.missing_intervals = set()  # the meter answers the row this time
    fleet.clock.advance(15 * 60)
    second = (await engine.run_plan(plan, NOW + STEP)).results[0]
    assert second.missing == () and second.expected_intervals == 4  # re-read from just before the gap
    stamps = {r.timestamp for p in fleet.outbox.take_sync(10_000) for r in p.readings}
    assert gap in stamps


async def test_a_gap_older_than_the_buffer_depth_is_reported_and_dropped(fleet: Fleet) -> None:
    engine = fleet.engine()
    plan = fleet.plan(read=["profile"], select={"meters": ["M1"]}, history="1h")
    fleet.meters["M1"].faults.missing_intervals = {LAST - 3 * STEP}
    first = (await engine.run_plan(plan, NOW)).results[0]
    assert first.missing == (LAST - 3 * STEP,)
    later = NOW + 2 * timedelta(hours=1)
    fleet.clock.set(later)
    second = (await engine.run_plan(plan, later)).results[0]
    assert second.expected_intervals == 4 and second.missing == ()  # the old gap is past `history`


async def test_clock_drift_is_synced_and_the_intervals_read_meanwhile_flagged(fleet: Fleet) -> None:
    fleet.meters["M2"].faults.clock_offset_s = 120
    engine = fleet.engine()
    result = (await engine.run_plan(fleet.plan(select={"meters": ["M2"]}), NOW)).results[0]
    assert result.ok and result.drift_s == pytest.approx(120) and result.clock_synced
    assert fleet.meters["M2"].faults.clock_offset_s == 0
    readings = [r for p in fleet.outbox.take_sync(10_000) for r in p.readings]
    intervals = [r for r in readings if r.kind == "interval"]
    assert intervals and all(Quality.CLOCK_DRIFT in r.qualities for r in intervals)
    assert all(Quality.CLOCK_DRIFT not in r.qualities for r in readings if r.kind == "register")


async def test_the_event_log_is_read_from_the_last_stored_event(fleet: Fleet) -> None:
    sim = fleet.meters["M3"]
    outage = (LAST - 4 * STEP, LAST - 2 * STEP)
    sim.power_outage(*outage)
    sim.faults.clock_offset_s = 300  # synced this run: the meter logs clock adjusted (old, new)
    engine = fleet.engine()
    plan = fleet.plan(read=["clock", "events"], select={"meters": ["M3"]})
    first = (await engine.run_plan(plan, NOW)).results[0]
    assert first.ok and first.events == 4 and first.clock_synced
    events = [r for p in fleet.outbox.take_sync(100) for r in p.readings if r.kind == "event"]
    # Power down and up, then clock adjusted: the new time (5) and the old one (4) the meter
    # logged in its own time, five minutes ahead.
    assert [(r.timestamp, r.value) for r in events] == [
        (outage[0], 1.0), (outage[1], 2.0), (NOW.replace(microsecond=0), 5.0), (NOW + timedelta(seconds=300), 4.0),
    ]  # fmt: skip
    assert all(r.channel == EVENT_LOG for r in events)
    sim.power_outage(LAST + 2 * STEP, LAST + 3 * STEP)  # a later outage: only it is new next run
    fleet.clock.set(LAST + 4 * STEP)
    second = (await engine.run_plan(plan, LAST + 4 * STEP)).results[0]
    assert second.events == 2


@dataclass
class ModbusSite:
    engine: PollingEngine
    plan: Plan
    clock: ManualClock
    sim: ModbusSimulator
    outbox: Outbox


@contextlib.asynccontextmanager
async def modbus_site(tmp_path: Path, start: datetime, plan: dict[str, object]) -> AsyncIterator[ModbusSite]:
    """One simulated relay meter (unit 1, no load profile, no event log) behind a TCP gateway."""
    clock = ManualClock(start)
    meter_map = shipped_maps()["sim-relay-meter"]
    sim = ModbusSimulator([SimulatedMeter(1, meter_map, clock)])
    port = free_port()
    await sim.start_tcp("127.0.0.1", port)
    link = ModbusLink.tcp("127.0.0.1", port, timeout=1)
    cfg = parse_config({
        "links": [{"id": "gw", "kind": "tcp", "protocol": "modbus-tcp", "host": "127.0.0.1", "port": port}],
        "meters": [{"id": "MB", "link": "gw", "address": 1, "map": "sim-relay-meter"}],
        "plans": [{"id": "p", "every": "15m", **plan}],
    })  # fmt: skip
    outbox = Outbox(tmp_path / "outbox.sqlite")
    engine = PollingEngine(Registry(cfg), outbox, lambda m: link.session(m, 1, meter_map, now=clock.datetime),
                           clock=clock.datetime)  # fmt: skip
    try:
        yield ModbusSite(engine, cfg.plans[0], clock, sim, outbox)
    finally:
        link.close()
        await sim.stop()
        outbox.close()


async def test_a_plan_asking_for_events_tells_which_meters_have_no_event_log(tmp_path: Path) -> None:
    async with modbus_site(tmp_path, NOW, {"read": ["registers", "events"], "channels": ["1-0:1.8.0"]}) as site:
        result = await site.engine.read_meter("MB", site.plan, NOW)
    assert result.ok and result.readings == 1  # the register still counts
    assert len(result.unsupported) == 1 and "no event log" in result.unsupported[0]


async def test_a_hung_meter_is_given_up_at_the_plan_deadline_and_the_rest_finish(fleet: Fleet) -> None:
    fleet.meters["M4"].faults.delay = 30  # answers far too late; its session timeout is longer still

    def session(m: str) -> DlmsSession:
        return DlmsSession.tcp_wrapper("127.0.0.1", fleet.ports[m], m, authentication="lls", password=b"12345678",
                                       timeout=60, now=fleet.clock.datetime)  # fmt: skip

    engine = PollingEngine(Registry(fleet.config), fleet.outbox, session, clock=fleet.clock.datetime)
    seen: list[str] = []
    plan = fleet.plan(select={"meters": ["M0", "M1", "M4"]}, read=["profile"])
    report = await engine.run_plan(plan, NOW, deadline_s=0.5, on_result=lambda r: seen.append(r.meter))
    by_meter = {r.meter: r for r in report.results}
    assert by_meter["M0"].ok and by_meter["M1"].ok
    assert not by_meter["M4"].ok and "plan deadline (0.5 s)" in by_meter["M4"].error
    assert sorted(seen) == ["M0", "M1", "M4"] and seen[-1] == "M4"  # results reported as they come


async def test_meters_still_in_line_at_the_plan_deadline_are_given_up_without_a_session(fleet: Fleet) -> None:
    fleet.meters["M0"].faults.delay = 30  # holds the one session the line carries past the deadline
    opened: list[str] = []

    def session(m: str) -> DlmsSession:
        opened.append(m)
        return DlmsSession.tcp_wrapper("127.0.0.1", fleet.ports[m], m, authentication="lls", password=b"12345678",
                                       timeout=60, now=fleet.clock.datetime)  # fmt: skip

    # One session at a time for all of them: the others wait in line behind M0.
    engine = PollingEngine(Registry(fleet.config), fleet.outbox, session, clock=fleet.clock.datetime, tcp_sessions=1)
    seen: list[str] = []
    plan = fleet.plan(select={"meters": ["M0", "M1", "M2", "M3"]}, read=["profile"])
    report = await engine.run_plan(plan, NOW, deadline_s=0.5, on_result=lambda r: seen.append(r.meter))
    assert opened == ["M0"]  # the meters still in line at the deadline cost the line nothing
    assert [r.meter for r in report.results] == ["M0", "M1", "M2", "M3"]
    assert all(not r.ok and "plan deadline (0.5 s)" in r.error for r in report.results)
    assert sorted(seen) == ["M0", "M1", "M2", "M3"]  # each reported once
    assert {t.get_coro().__qualname__ for t in asyncio.all_tasks()} & {"PollingEngine.run_plan.<locals>.work"} == set()


class SimulatedTime:
    """The plan loop's clock and pause: waiting advances time instead of sleeping."""

    def __init__(self, start: datetime) -> None:
        self.t = start

    def now(self) -> datetime:
        return self.t

    async def pause(self, stop: asyncio.Event, seconds: float) -> None:
        self.t += timedelta(seconds=max(0.0, seconds))
        await asyncio.sleep(0)


async def test_the_watchdog_restarts_a_plan_loop_that_failed_and_it_goes_on_reading(fleet: Fleet) -> None:
    time = SimulatedTime(NOW)
    broken = {"left": 1}
    engine = fleet.engine()
    run_plan = engine.run_plan

    async def failing_once(plan: Plan, now: datetime, *args: object, **kwargs: object) -> object:
        # A bug outside any one meter's read (one inside it fails only that meter).
        if broken["left"]:
            broken["left"] -= 1
            raise RuntimeError("a bug in a session factory")
        return await run_plan(plan, now, *args, **kwargs)  # type: ignore[arg-type]

    engine.run_plan = failing_once  # type: ignore[method-assign]
    restarts: list[BaseException] = []
    stop = asyncio.Event()
    plan = fleet.plan(select={"meters": ["M0"]}, read=["clock"], every="15m")
    loop = PlanLoop(plan, engine, clock=time.now, pause=time.pause, jitter=False, on_restart=restarts.append,
                    on_report=lambda _r: stop.set() if loop.stats.runs == 1 else None)  # fmt: skip
    await asyncio.wait_for(loop.run(stop), 10)
    assert [str(e) for e in restarts] == ["a bug in a session factory"]
    assert loop.stats.restarts == 1 and loop.stats.runs == 1 and "RuntimeError" in loop.stats.last_error
    assert loop.stats.last_finished is not None and loop.stats.last_finished > NOW


async def test_a_plan_runs_at_its_due_times_with_the_deadline_until_the_next_run(fleet: Fleet) -> None:
    time = SimulatedTime(NOW)
    deadlines: list[float] = []
    engine = fleet.engine()
    run_plan = engine.run_plan

    async def recording(plan: Plan, now: datetime, *args: object, **kwargs: object) -> object:
        deadlines.append(kwargs["deadline_s"])  # type: ignore[arg-type]
        return await run_plan(plan, now, *args, **kwargs)  # type: ignore[arg-type]

    engine.run_plan = recording  # type: ignore[method-assign]
    stop = asyncio.Event()
    starts: list[datetime] = []
    plan = fleet.plan(select={"meters": ["M0"]}, read=["clock"], every="15m")
    loop = PlanLoop(plan, engine, clock=time.now, pause=time.pause, jitter=False,
                    on_report=lambda r: (starts.append(r.started), len(starts) == 3 and stop.set()))  # fmt: skip
    await asyncio.wait_for(loop.run(stop), 10)
    assert starts == [LAST + STEP, LAST + 2 * STEP, LAST + 3 * STEP]
    assert deadlines == [900.0] * 3


async def gate_order(first: Lane, lined_up: list[tuple[str, Lane]]) -> tuple[list[str], int]:
    """The order a one-session link serves `lined_up`, queued behind a job of lane `first`
    that holds the link meanwhile; and how many were queued."""
    gate = LinkGate(1)
    order: list[str] = []
    hold = asyncio.Event()

    async def job(name: str, lane: Lane, started: asyncio.Event | None = None) -> None:
        async with gate.slot(lane):
            order.append(name)
            if started is not None:
                started.set()
                await hold.wait()

    running = asyncio.Event()
    holder = asyncio.create_task(job(f"{first.name.lower()}-0", first, running))
    await running.wait()
    queued = [asyncio.create_task(job(n, lane)) for n, lane in lined_up]
    await asyncio.sleep(0)  # let them line up behind the running job
    waiting = gate.queued
    hold.set()
    await asyncio.gather(holder, *queued)
    return order, waiting


async def test_switching_goes_ahead_of_bulk_reads_on_a_busy_link() -> None:
    order, queued = await gate_order(Lane.BULK, [("bulk-2", Lane.BULK), ("backfill", Lane.BACKFILL),
                                                 ("switch", Lane.SWITCHING)])  # fmt: skip
    assert queued == 3
    assert order == ["bulk-0", "switch", "backfill", "bulk-2"]


async def test_re_reads_and_bulk_reads_take_turns_so_neither_starves() -> None:
    """A fleet of meters with gaps keeps the backfill lane full; the plan's bulk reads still
    get every other turn on the link (and switching still goes first)."""
    lined_up = [("reread-1", Lane.BACKFILL), ("reread-2", Lane.BACKFILL), ("reread-3", Lane.BACKFILL),
                ("bulk-1", Lane.BULK), ("bulk-2", Lane.BULK), ("switch", Lane.SWITCHING)]  # fmt: skip
    order, _queued = await gate_order(Lane.BULK, lined_up)
    assert order == ["bulk-0", "switch", "reread-1", "bulk-1", "reread-2", "bulk-2", "reread-3"]


async def test_a_meter_without_load_profile_gets_intervals_from_boundary_reads(tmp_path: Path) -> None:
    start = datetime(2026, 3, 9, 10, 0, 12, tzinfo=UTC)
    async with modbus_site(tmp_path, start, {"read": ["profile"]}) as site:
        results = []
        for minutes in (0, 15, 45, 60):  # the read at 10:30 is missed
            site.clock.set(start + timedelta(minutes=minutes))
            results.append(await site.engine.read_meter("MB", site.plan, site.clock.datetime()))
        assert [r.expected_intervals for r in results] == [0, 1, 2, 1]
        assert [r.received_intervals for r in results] == [0, 1, 0, 1]
        assert results[2].missing == (LAST + 2 * STEP, LAST + 3 * STEP)  # both sides of the missed boundary
        intervals = [r for p in site.outbox.take_sync(100) for r in p.readings if r.kind == "interval"]
        meter = site.sim.meters[1]
    first = next(r for r in intervals if r.value is not None)
    energy = Obis(1, 0, 1, 8, 0)
    expected_kwh = meter.expected(energy, (start + STEP).timestamp()) - meter.expected(energy, start.timestamp())
    assert first.timestamp == LAST + STEP and first.value == pytest.approx(expected_kwh)
    assert sum(1 for r in intervals if r.value is None and Quality.MISSING in r.qualities) == 2


async def test_a_meter_that_never_stops_talking_is_cut_off_and_the_others_are_read(fleet: Fleet) -> None:
    fleet.meters["M4"].faults.endless_blocks = True  # every GET answered in blocks without end

    def session(m: str) -> DlmsSession:
        return DlmsSession.tcp_wrapper("127.0.0.1", fleet.ports[m], m, authentication="lls", password=b"12345678",
                                       timeout=2, session_deadline=60, max_get_bytes=1 << 20,
                                       now=fleet.clock.datetime)  # fmt: skip

    engine = PollingEngine(Registry(fleet.config), fleet.outbox, session, clock=fleet.clock.datetime)
    seen: list[str] = []
    plan = fleet.plan(select={"meters": ["M0", "M1", "M4"]}, read=["profile"])
    report = await engine.run_plan(plan, NOW, on_result=lambda r: seen.append(r.meter))
    by_meter = {r.meter: r for r in report.results}
    assert by_meter["M0"].ok and by_meter["M1"].ok
    assert not by_meter["M4"].ok and "no end in sight" in by_meter["M4"].error
    assert by_meter["M4"].error_type == "BadFrame"


async def test_a_dead_unit_behind_a_gateway_never_stalls_its_nine_neighbours(tmp_path: Path) -> None:
    """Its own breaker opens, not the gateway's: every run reads the nine others, and the dead
    one is skipped (logged and counted) until its cooldown has passed."""
    clock = ManualClock(NOW)
    meter_map = shipped_maps()["sim-relay-meter"]
    units = [SimulatedMeter(u, meter_map, clock) for u in range(1, 11)]
    units[4].faults.no_response = True  # unit 5
    sim = ModbusSimulator(units)
    port = free_port()
    await sim.start_tcp("127.0.0.1", port)
    link = ModbusLink.tcp("127.0.0.1", port, timeout=0.2)
    cfg = parse_config({
        "links": [{"id": "gw", "kind": "tcp", "protocol": "modbus-tcp", "host": "127.0.0.1", "port": port}],
        "meters": [{"id": f"U{u}", "link": "gw", "address": u, "map": "sim-relay-meter"} for u in range(1, 11)],
        "plans": [{"id": "p", "every": "15m", "read": ["registers"], "channels": ["1-0:1.8.0"], "attempts": 3}],
    })  # fmt: skip
    outbox = Outbox(tmp_path / "outbox.sqlite")

    async def no_wait(_seconds: float) -> None:
        return None

    engine = PollingEngine(Registry(cfg), outbox, lambda m: link.session(m, int(m[1:]), meter_map), sleep=no_wait,
                           breaker_threshold=3)  # fmt: skip
    try:
        for run in range(4):
            report = await engine.run_plan(cfg.plans[0], NOW + run * STEP)
            by_meter = {r.meter: r for r in report.results}
            assert sorted(m for m, r in by_meter.items() if r.ok) == sorted(f"U{u}" for u in range(1, 11) if u != 5)
            assert engine.breaker("gw").state() == "closed", "the gateway stays in service"
            if run:
                assert by_meter["U5"].skipped and "meter circuit open" in by_meter["U5"].error
        assert engine.stats.skipped == 3 and engine.meter_breaker("U5").state() == "open"
    finally:
        link.close()
        await sim.stop()
        outbox.close()


async def test_a_gateway_down_is_one_warning_not_one_per_meter_it_skips(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """While a gateway's breaker is open the log says once that its meters are skipped (490
    gateways down were 98,000 lines, and held the event loop); the figures count every one."""
    port = free_port()  # nothing listens: the gateway is down
    link = ModbusLink.tcp("127.0.0.1", port, timeout=0.2)
    meter_map = shipped_maps()["sim-relay-meter"]
    cfg = parse_config({
        "links": [{"id": "gw", "kind": "tcp", "protocol": "modbus-tcp", "host": "127.0.0.1", "port": port}],
        "meters": [{"id": f"U{u}", "link": "gw", "address": u, "map": "sim-relay-meter"} for u in range(1, 41)],
        "plans": [{"id": "p", "every": "15m", "read": ["registers"], "channels": ["1-0:1.8.0"], "attempts": 1}],
    })  # fmt: skip
    outbox = Outbox(tmp_path / "outbox.sqlite")
    engine = PollingEngine(Registry(cfg), outbox, lambda m: link.session(m, int(m[1:]), meter_map),
                           breaker_threshold=3)  # fmt: skip
    try:
        await engine.run_plan(cfg.plans[0], NOW)  # its sessions fail: the breaker opens
        assert engine.breaker("gw").state() == "open"
        with caplog.at_level("WARNING", logger="headend.scheduler.engine"):
            report = await engine.run_plan(cfg.plans[0], NOW + STEP)
        assert len(report.results) == 40 and all(r.skipped for r in report.results) and engine.stats.skipped == 40
        said = [r.getMessage() for r in caplog.records if "not read by plan" in r.getMessage()]
        assert len(said) == 1 and "and its other meters while it stays open" in said[0]
        assert "link gw circuit open" in said[0]
    finally:
        link.close()
        outbox.close()


async def test_a_30_second_plan_takes_each_boundary_read_at_its_boundary_never_before(tmp_path: Path) -> None:
    """Reads at hh:14:30 and hh:15:30 are within a minute of hh:15 too, but only the read at or
    after the boundary counts for it, and the first such read stands: every interval equals
    the register difference between its boundaries."""
    start = datetime(2026, 3, 9, 10, 0, 0, tzinfo=UTC)
    async with modbus_site(tmp_path, start, {"read": ["profile"]}) as site:
        for n in range(2 * 46):  # every 30 s for 46 minutes
            site.clock.set(start + n * timedelta(seconds=30))
            result = await site.engine.read_meter("MB", site.plan, site.clock.datetime())
            assert result.ok
        intervals = {r.timestamp: r.value for p in site.outbox.take_sync(1000) for r in p.readings
                     if r.kind == "interval"}  # fmt: skip
        meter = site.sim.meters[1]
    energy = Obis(1, 0, 1, 8, 0)
    assert sorted(intervals) == [start + k * STEP for k in (1, 2, 3)]
    for end, value in intervals.items():
        at_boundaries = meter.expected(energy, end.timestamp()) - meter.expected(energy, (end - STEP).timestamp())
        assert value == pytest.approx(at_boundaries)


async def test_drift_is_measured_and_the_clock_set_against_the_time_of_the_read_not_the_run(fleet: Fleet) -> None:
    """A meter read five minutes into a plan's run: its drift is against the time it was read
    (a correct meter shows none), and a drifting meter is set to that time, not to the run's start."""
    engine = fleet.engine()
    plan = fleet.plan(read=["clock"], select={"meters": ["M0", "M1"]})
    fleet.clock.set(NOW + timedelta(minutes=5))
    fleet.meters["M1"].faults.clock_offset_s = 7200.0  # two hours fast
    on_time = await engine.read_meter("M0", plan, NOW)
    fast = await engine.read_meter("M1", plan, NOW)
    assert on_time.drift_s == 0.0 and not on_time.clock_synced
    assert fast.drift_s == 7200.0 and fast.clock_synced
    assert fleet.meters["M1"].now() == fleet.clock.datetime(), "set to the time of the read, to the second"


async def test_a_bug_in_one_meters_read_fails_that_meter_and_the_run_reads_the_others(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue #16's attacker pass: an HDLC answer no check foresaw raised ValueError out of the
    driver, which ended the whole plan run (and every run after it) for every meter."""
    def session(meter_id: str) -> DlmsSession:
        if meter_id == "M2":
            raise ValueError("range() arg 3 must not be zero")  # what the driver raised
        return DlmsSession.tcp_wrapper("127.0.0.1", fleet.ports[meter_id], meter_id, authentication="lls",
                                       password=b"12345678", timeout=1, now=fleet.clock.datetime)  # fmt: skip

    async def no_wait(_seconds: float) -> None:
        return None

    engine = PollingEngine(Registry(fleet.config), fleet.outbox, session, sleep=no_wait,  # type: ignore[arg-type]
                           clock=fleet.clock.datetime)  # fmt: skip
    report = await engine.run_plan(fleet.plan(), NOW)
    by_meter = {r.meter: r for r in report.results}
    assert not by_meter["M2"].ok and "unexpected error: ValueError" in by_meter["M2"].error
    assert all(by_meter[m].ok for m in fleet.meters if m != "M2")
    assert "M2: plan lp: the read failed unexpectedly" in caplog.text
