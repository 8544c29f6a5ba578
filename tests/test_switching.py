"""Remote disconnect/reconnect with confirmation, against the simulator of every protocol
that has a relay: DLMS (class 70), Modbus (relay coil), MQTT concentrator."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from headend.config import Config, parse_config
from headend.localservers import MosquittoServer, free_port
from headend.model import RelayAction, RelayState
from headend.protocols.base import MeterSession
from headend.protocols.dlms.client import DlmsSession
from headend.protocols.modbus import ModbusLink
from headend.protocols.modbus_maps import shipped_maps
from headend.protocols.mqtt import ConcentratorLink
from headend.registry import Registry
from headend.scheduler.gate import Lane
from headend.storage.outbox import Outbox
from headend.switching.engine import SwitchingEngine
from headend.switching.journal import CommandJournal, CommandState
from headend.switching.policy import SwitchingPolicy
from headend.switching.ratelimit import LinkLimiter
from headend.switching.runner import CommandRunner
from simulators.clock import ManualClock
from simulators.dlms_meter import SimulatedDlmsMeter
from simulators.modbus_meter import ModbusSimulator, SimulatedMeter
from simulators.mqtt_concentrator import SimulatedConcentrator
from tests.conftest import Spawn

MONDAY_10 = datetime(2026, 3, 9, 10, 0, tzinfo=UTC)  # inside mon-fri 08:00-15:00
SATURDAY_10 = datetime(2026, 3, 14, 10, 0, tzinfo=UTC)
METERS = ("C-1", "H-1")
ROOT = Path(__file__).resolve().parent.parent  # an ordinary customer and a hospital


@dataclass
class Rig:
    """One protocol's simulated meters, and how to talk to and poke them."""

    sessions: Callable[[str], MeterSession]
    relay: Callable[[str], RelayState]
    operations: Callable[[str], int]
    stick: Callable[[str], None]


def config() -> Config:
    return parse_config(
        {
            "links": [{"id": "direct", "kind": "tcp", "protocol": "dlms-wrapper", "host": "127.0.0.1", "port": 1}],
            "meters": [
                {"id": "C-1", "link": "direct"},
                {"id": "H-1", "link": "direct", "protected": True, "protection": "hospital"},
            ],
            "switching": {"timezone": "UTC", "holidays": ["2026-03-10"]},
        }
    )


@pytest.fixture(params=["dlms", "modbus", "mqtt"])
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[Rig]:
    clock = ManualClock(MONDAY_10)
    if request.param == "dlms":
        dlms = {m: SimulatedDlmsMeter(m, clock, seed=i + 1) for i, m in enumerate(METERS)}
        for meter in dlms.values():
            await meter.start()

        def state(m: str) -> RelayState:
            return [RelayState.DISCONNECTED, RelayState.CONNECTED, RelayState.READY_FOR_RECONNECTION][
                dlms[m].control_state
            ]

        yield Rig(
            lambda m: DlmsSession.tcp_wrapper("127.0.0.1", dlms[m].port, m, authentication="lls",
                                              password=b"12345678", timeout=2),
            state, lambda m: dlms[m].actions, lambda m: setattr(dlms[m].faults, "stuck_relay", True),
        )  # fmt: skip
        for meter in dlms.values():
            await meter.stop()
    elif request.param == "modbus":
        meter_map = shipped_maps()["sim-relay-meter"]
        sim = ModbusSimulator([SimulatedMeter(u, meter_map, clock) for u in (1, 2)])
        unit = {"C-1": 1, "H-1": 2}
        port = free_port()
        await sim.start_tcp("127.0.0.1", port)
        link = ModbusLink.tcp("127.0.0.1", port, timeout=1)
        yield Rig(
            lambda m: link.session(m, unit[m], meter_map),
            lambda m: RelayState.CONNECTED if sim.meters[unit[m]].relay_connected else RelayState.DISCONNECTED,
            lambda m: sim.meters[unit[m]].relay_writes,
            lambda m: setattr(sim.meters[unit[m]].faults, "stuck_relay", True),
        )
        link.close()
        await sim.stop()
    else:
        broker: MosquittoServer = request.getfixturevalue("mosquitto_server")
        tmp: Path = request.getfixturevalue("tmp_path")
        cid = f"dc-{uuid.uuid4().hex[:8]}"
        dc = SimulatedConcentrator(cid, "127.0.0.1", broker.port, list(METERS), clock)
        outbox = Outbox(tmp / "outbox.sqlite")
        async with ConcentratorLink(
            "127.0.0.1", broker.port, outbox, headend_id=f"he-{cid}", command_timeout=3
        ) as link:
            await link.connected.wait()
            await dc.start()
            await link.until(lambda: cid in link.concentrators and link.concentrators[cid].online)
            yield Rig(
                lambda m: link.session(m, cid),
                lambda m: RelayState.CONNECTED if dc.loads[m].relay_connected else RelayState.DISCONNECTED,
                lambda m: sum(1 for name, c in dc.commands if name == "relay" and c.meter == m),
                lambda m: dc.faults.stuck_relays.add(m),
            )
            await dc.stop()
        outbox.close()


def engine(rig: Rig, tmp_path: Path, now: datetime = MONDAY_10) -> SwitchingEngine:
    cfg = config()
    return SwitchingEngine(
        CommandJournal(tmp_path / "journal.sqlite"), SwitchingPolicy(cfg.switching), Registry(cfg), rig.sessions,
        confirm_timeout=0.5, poll_interval=0.05, attempts=2, now=lambda: now,
    )  # fmt: skip


async def test_disconnect_then_reconnect_confirmed_with_evidence(rig: Rig, tmp_path: Path) -> None:
    e = engine(rig, tmp_path)
    off = await e.execute("C-1", RelayAction.DISCONNECT, who="op-anna", why="arrears #4711")
    assert off.state == CommandState.CONFIRMED and rig.relay("C-1") == RelayState.DISCONNECTED
    assert off.evidence["relay_before"] == "connected" and off.evidence["relay_after"] == "disconnected"
    assert isinstance(off.evidence["register_at_switching"], float)
    on = await e.execute("C-1", RelayAction.RECONNECT, who="billing", why="payment received")
    assert on.state == CommandState.CONFIRMED and rig.relay("C-1") == RelayState.CONNECTED
    assert [ev.state for ev in e.journal.events(off.id)] == ["requested", "queued", "running", "sent", "confirmed"]
    assert e.journal.events(off.id)[0].detail["who"] == "op-anna"
    assert rig.operations("C-1") == 2


async def test_a_stuck_relay_ends_failed_with_evidence(rig: Rig, tmp_path: Path) -> None:
    rig.stick("C-1")
    e = engine(rig, tmp_path)
    command = await e.execute("C-1", RelayAction.DISCONNECT, who="op", why="arrears")
    assert command.state == CommandState.FAILED
    assert command.evidence["relay_before"] == "connected"
    assert "relay still connected" in command.evidence["error"]
    assert command.attempts == 2 and rig.relay("C-1") == RelayState.CONNECTED


async def test_a_protected_customer_needs_an_override_in_the_request_and_the_role(rig: Rig, tmp_path: Path) -> None:
    e = engine(rig, tmp_path)
    refused = await e.execute("H-1", RelayAction.DISCONNECT, who="op", why="arrears")
    assert refused.state == CommandState.REJECTED and rig.operations("H-1") == 0
    assert refused.reason_code == "protected" and "protected customer (hospital)" in refused.reason
    role_only = await e.execute("H-1", RelayAction.DISCONNECT, who="chief", why="arrears list",
                                roles=frozenset({"operator", "override"}))  # fmt: skip
    assert role_only.state == CommandState.REJECTED and role_only.reason_code == "protected"
    no_role = await e.execute("H-1", RelayAction.DISCONNECT, who="op", why="arrears", override_reason="court order")
    assert no_role.state == CommandState.REJECTED and no_role.reason_code == "override_forbidden"
    assert rig.operations("H-1") == 0
    allowed = await e.execute("H-1", RelayAction.DISCONNECT, who="chief", why="court order 12/26",
                              roles=frozenset({"operator", "override"}), override_reason="court order 12/26")
    assert allowed.state == CommandState.CONFIRMED and allowed.override
    assert "under override: court order 12/26" in e.journal.events(allowed.id)[1].detail["reason"]


async def test_disconnects_only_inside_the_window_reconnects_any_time(rig: Rig, tmp_path: Path) -> None:
    e = engine(rig, tmp_path, now=SATURDAY_10)
    refused = await e.execute("C-1", RelayAction.DISCONNECT, who="op", why="arrears", defer=False)
    assert refused.state == CommandState.REJECTED and refused.reason_code == "outside_window"
    assert "not allowed at Sat 2026-03-14 10:00" in refused.reason
    waiting = await e.execute("C-1", RelayAction.DISCONNECT, who="op", why="arrears")
    assert waiting.state == CommandState.DEFERRED and rig.operations("C-1") == 0
    # Monday 9 March is a working day but Tuesday the 10th is a holiday: the next opening is Monday 08:00.
    assert waiting.not_before_ns == int(datetime(2026, 3, 16, 8, 0, tzinfo=UTC).timestamp() * 1e9)
    assert "next window opens Mon 2026-03-16 08:00" in waiting.reason
    paid = await e.execute("C-1", RelayAction.RECONNECT, who="billing", why="paid")
    assert paid.state == CommandState.CONFIRMED and not paid.evidence["operated"]
    assert e.journal.get(waiting.id).state == CommandState.CANCELLED, "the payment cancelled the waiting disconnect"
    holiday = engine(rig, tmp_path, now=datetime(2026, 3, 10, 10, 0, tzinfo=UTC))
    on_holiday = holiday.request("C-1", RelayAction.DISCONNECT, who="op", why="x", defer=False).command
    assert on_holiday.state == CommandState.REJECTED and on_holiday.reason_code == "holiday"
    assert rig.operations("C-1") == 0


async def test_idempotency_and_one_open_command_per_meter(rig: Rig, tmp_path: Path) -> None:
    e = engine(rig, tmp_path)
    first = e.request("C-1", RelayAction.DISCONNECT, who="op", why="a", idempotency_key="req-1")
    again = e.request("C-1", RelayAction.DISCONNECT, who="op", why="a", idempotency_key="req-1")
    assert again.command.id == first.command.id and first.command.state == CommandState.QUEUED and not again.new
    other = e.request("C-1", RelayAction.DISCONNECT, who="op2", why="arrears").command
    assert other.state == CommandState.REJECTED and other.reason_code == "open_command"
    assert f"open command {first.command.id}" in other.reason
    assert (await e.run(first.command.id)).state == CommandState.CONFIRMED
    assert (await e.run(first.command.id)).state == CommandState.CONFIRMED, "a second run finds nothing to claim"
    assert rig.operations("C-1") == 1


async def test_after_a_restart_a_sent_command_is_confirmed_by_read_back_not_resent(rig: Rig, tmp_path: Path) -> None:
    e = engine(rig, tmp_path)
    command = e.request("C-1", RelayAction.DISCONNECT, who="op", why="arrears").command
    # The head-end claimed and journaled `sent`, operated the relay, and died before reading it back.
    assert e.journal.claim(command.id, "dead-runner") is not None
    e.journal.transition(command.id, CommandState.SENT, {"attempt": 1}, {"relay_before": "connected"}, attempt=True,
                         owner="dead-runner")  # fmt: skip
    async with rig.sessions("C-1") as session:
        await session.operate_relay(RelayAction.DISCONNECT)
    e.journal.close()
    restarted = engine(rig, tmp_path)
    (found,) = restarted.recover()
    recovered = await restarted.reconfirm(found)
    assert recovered is not None
    assert recovered.state == CommandState.CONFIRMED and recovered.evidence["relay_after"] == "disconnected"
    assert rig.operations("C-1") == 1, "the relay was operated once"


async def test_a_reconnect_to_ready_for_reconnection_is_its_own_confirmed_state(tmp_path: Path) -> None:
    meter = SimulatedDlmsMeter("C-1", ManualClock(MONDAY_10), control_mode=1)
    await meter.start()
    cfg = config()
    e = SwitchingEngine(
        CommandJournal(tmp_path / "journal.sqlite"), SwitchingPolicy(cfg.switching), Registry(cfg),
        lambda m: DlmsSession.tcp_wrapper("127.0.0.1", meter.port, m, authentication="lls", password=b"12345678"),
        confirm_timeout=0.5, poll_interval=0.05, now=lambda: MONDAY_10,
    )  # fmt: skip
    assert (await e.execute("C-1", RelayAction.DISCONNECT, who="op", why="arrears")).state == CommandState.CONFIRMED
    back = await e.execute("C-1", RelayAction.RECONNECT, who="billing", why="paid")
    assert back.state == CommandState.CONFIRMED_READY
    assert back.evidence["relay_after"] == "ready_for_reconnection"
    await meter.stop()


async def test_killed_after_send_and_before_confirm_the_restart_confirms_by_read_back(
    tmp_path: Path, spawn: Spawn
) -> None:
    meter_map = shipped_maps()["sim-relay-meter"]
    sim = ModbusSimulator([SimulatedMeter(1, meter_map, ManualClock(MONDAY_10))])
    port = free_port()
    await sim.start_tcp("127.0.0.1", port)
    root = ROOT
    common = ["--port", str(port), "--journal", str(tmp_path / "journal.sqlite")]

    async def worker(*args: str) -> asyncio.subprocess.Process:
        return await spawn(
            sys.executable, "-m", "tests.switching_worker", *args, *common, cwd=root,
            stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(root)},
        )  # fmt: skip

    first = await worker("run", "--freeze")
    assert first.stdout is not None
    async with asyncio.timeout(30):
        assert (await first.stdout.readline()).strip() == b"OPERATED"
    first.kill()
    await first.wait()
    journal = CommandJournal(tmp_path / "journal.sqlite")
    (command,) = journal.find()
    assert command.state == CommandState.SENT and not sim.meters[1].relay_connected
    journal.close()

    second = await worker("recover")
    out, _ = await asyncio.wait_for(second.communicate(), 30)
    (recovered,) = json.loads(out)
    assert recovered["state"] == "confirmed" and recovered["evidence"]["relay_after"] == "disconnected"
    assert sim.meters[1].relay_writes == 1, "the relay was operated once, not again after the restart"
    await sim.stop()


async def test_disconnects_are_paced_per_link() -> None:
    now = [0.0]

    async def fake_sleep(seconds: float) -> None:
        now[0] += seconds  # simulated time: the limiter's waiting is what is under test

    limiter = LinkLimiter(2, monotonic=lambda: now[0], sleep=fake_sleep)
    waits = [await limiter.acquire("rs485-a") for _ in range(4)]
    assert waits[:2] == [0.0, 0.0]  # a burst of the rate goes at once
    assert waits[2] == pytest.approx(30.0) and waits[3] == pytest.approx(30.0)
    assert await limiter.acquire("rs485-b") == 0.0  # another line has its own budget


async def test_a_command_past_its_deadline_expires_instead_of_running_late(rig: Rig, tmp_path: Path) -> None:
    e = engine(rig, tmp_path)
    e.deadline = 0.0
    command = e.request("C-1", RelayAction.DISCONNECT, who="op", why="arrears").command
    expired = await e.run(command.id)
    assert expired.state == CommandState.EXPIRED and rig.operations("C-1") == 0
    assert expired.reason_code == "expired" and "not run before its deadline" in expired.reason


def test_a_first_wave_journal_is_migrated_in_place(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "journal.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE commands (id TEXT PRIMARY KEY, meter TEXT NOT NULL, action TEXT NOT NULL, who TEXT NOT NULL,
            why TEXT NOT NULL, idempotency_key TEXT NOT NULL UNIQUE, override INTEGER NOT NULL, state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0, created_ns INTEGER NOT NULL, updated_ns INTEGER NOT NULL,
            evidence TEXT NOT NULL DEFAULT '{}');
        CREATE INDEX commands_meter_state ON commands (meter, state);
        CREATE TABLE events (command_id TEXT NOT NULL REFERENCES commands (id), state TEXT NOT NULL,
            at_ns INTEGER NOT NULL, detail TEXT NOT NULL);
        INSERT INTO commands VALUES ('c1', 'C-1', 'disconnect', 'op', 'arrears', 'k1', 1, 'confirmed', 1, 1, 2,
            '{"relay_after": "disconnected"}');
        INSERT INTO events VALUES ('c1', 'confirmed', 2, '{}');
    """)
    db.close()
    journal = CommandJournal(path)
    old = journal.get("c1")
    assert old.state == CommandState.CONFIRMED and old.override and old.evidence["relay_after"] == "disconnected"
    assert [e.state for e in journal.events("c1")] == ["confirmed"]
    again = journal.create("C-1", RelayAction.RECONNECT, who="op", why="paid", idempotency_key="k1")
    assert again.new, "keys are scoped by action now"
    journal.close()
    assert CommandJournal(path).get("c1").state == CommandState.CONFIRMED  # opening twice migrates once


async def test_the_window_closes_while_disconnects_are_queued_and_they_wait_for_the_next(tmp_path: Path) -> None:
    """30 disconnects queued behind a busy link when the window closes (simulated wall clock):
    none is sent after the close; each is deferred to the next opening and runs then."""
    meter_map = shipped_maps()["sim-relay-meter"]
    sim = ModbusSimulator([SimulatedMeter(u, meter_map, ManualClock(MONDAY_10)) for u in range(1, 31)])
    port = free_port()
    await sim.start_tcp("127.0.0.1", port)
    link = ModbusLink.tcp("127.0.0.1", port, timeout=1)
    cfg = parse_config({
        "links": [{"id": "rs485", "kind": "serial", "protocol": "modbus-rtu", "device": "/dev/null"}],
        "meters": [{"id": f"C{u}", "link": "rs485", "address": u, "map": "sim-relay-meter"} for u in range(1, 31)],
        "switching": {"holidays": ["2026-03-10"]},
    })  # fmt: skip
    wall = [datetime(2026, 3, 9, 14, 59, 50, tzinfo=UTC)]  # ten seconds before the 15:00 close
    e = SwitchingEngine(
        CommandJournal(tmp_path / "journal.sqlite"), SwitchingPolicy(cfg.switching), Registry(cfg),
        lambda m: link.session(m, int(m[1:]), meter_map), confirm_timeout=0.5, poll_interval=0.05,
        now=lambda: wall[0], deadline=24 * 3600,
    )  # fmt: skip
    runner = CommandRunner(e)
    await runner.start()
    _key, gate = e.admission.gate("C1")
    try:
        async with gate.slot(Lane.BULK):  # a long read holds the line
            ids = [e.request(f"C{u}", RelayAction.DISCONNECT, who="op", why="arrears").command.id for u in range(1, 31)]
            for cid in ids:
                runner.submit(e.journal.get(cid))
            await asyncio.sleep(0)
            assert all(e.journal.get(c).state in ("queued", "running") for c in ids)
            wall[0] = datetime(2026, 3, 9, 15, 0, 1, tzinfo=UTC)  # the window closes while they wait
        await runner.join()
        states = {e.journal.get(c).state for c in ids}
        assert states == {CommandState.DEFERRED}
        assert sum(m.relay_writes for m in sim.meters.values()) == 0, "nothing sent after the close"
        deferred = e.journal.get(ids[0])
        assert deferred.not_before_ns == int(datetime(2026, 3, 11, 8, 0, tzinfo=UTC).timestamp() * 1e9)
        assert deferred.reason_code == "outside_window" and "next window opens Wed 2026-03-11 08:00" in deferred.reason
        assert runner.deferred == 30
        wall[0] = datetime(2026, 3, 11, 8, 0, 5, tzinfo=UTC)  # Tuesday the 10th is a holiday: Wednesday 08:00
        runner.clock_changed()
        async with asyncio.timeout(30):
            while runner.deferred:  # noqa: ASYNC110 - the runner's timer sees the new wall time
                await asyncio.sleep(0.01)
        await runner.join()
        assert {e.journal.get(c).state for c in ids} == {CommandState.CONFIRMED}
        assert all(m.relay_writes == 1 and not m.relay_connected for m in sim.meters.values())
        assert [ev.state for ev in e.journal.events(ids[0])] == [
            "requested", "queued", "running", "deferred", "queued", "running", "sent", "confirmed"]
    finally:
        await runner.stop()
        link.close()
        await sim.stop()


async def test_a_request_interrupted_before_its_decision_is_decided_on_its_own_roles(
    rig: Rig, tmp_path: Path
) -> None:
    e = engine(rig, tmp_path)
    # Killed between journaling the request and deciding on it: an override without the role.
    sneaky = e.journal.create("H-1", RelayAction.DISCONNECT, who="op", why="arrears", override_reason="I say so",
                              roles=frozenset({"operator"})).command  # fmt: skip
    honest = e.journal.create("C-1", RelayAction.DISCONNECT, who="op", why="arrears",
                              roles=frozenset({"operator"})).command  # fmt: skip
    found = {c.id: c for c in e.recover()}
    assert e.journal.get(sneaky.id).state == CommandState.REJECTED
    assert e.journal.get(sneaky.id).reason_code == "override_forbidden"
    assert found[honest.id].state == CommandState.QUEUED
    assert (await e.run(honest.id)).state == CommandState.CONFIRMED and rig.operations("H-1") == 0


async def test_a_meter_removed_from_the_registry_ends_its_commands_and_stalls_nothing(
    rig: Rig, tmp_path: Path
) -> None:
    e = engine(rig, tmp_path, now=SATURDAY_10)
    gone = e.request("H-1", RelayAction.RECONNECT, who="op", why="paid").command
    waiting = e.request("C-1", RelayAction.DISCONNECT, who="op", why="arrears").command
    assert waiting.state == CommandState.DEFERRED
    e.journal.close()
    cfg = parse_config({"links": [{"id": "direct", "kind": "tcp", "protocol": "dlms-wrapper", "host": "127.0.0.1",
                                   "port": 1}], "meters": [{"id": "C-1", "link": "direct"}]})  # H-1 decommissioned
    restarted = SwitchingEngine(CommandJournal(tmp_path / "journal.sqlite"), SwitchingPolicy(cfg.switching),
                                Registry(cfg), rig.sessions, confirm_timeout=0.5, poll_interval=0.05,
                                now=lambda: datetime(2026, 3, 16, 8, 30, tzinfo=UTC))  # fmt: skip
    runner = CommandRunner(restarted)
    await runner.start()
    await runner.join()
    assert restarted.journal.get(gone.id).state == CommandState.CANCELLED
    assert restarted.journal.get(gone.id).reason_code == "unknown_meter"
    async with asyncio.timeout(10):
        while restarted.journal.get(waiting.id).state != CommandState.CONFIRMED:  # noqa: ASYNC110 - the runner's timer
            await asyncio.sleep(0.01)
    await runner.stop()
