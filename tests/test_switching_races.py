"""Regressions from the attacker's pass on switching (issue #13): a paid customer always ends
connected (a reconnect lost in a crash is sent again, reconnects never expire, a disconnect
is never retried once a payment waits), the server never takes over a commissioning test's
command, an unapproved protected disconnect expires, and a link whose relays hang never
starves the other links."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from headend.config import Config, parse_config
from headend.localservers import free_port
from headend.model import RelayAction
from headend.protocols.modbus import ModbusLink
from headend.protocols.modbus_maps import shipped_maps
from headend.registry import Registry
from headend.switching.engine import SwitchingEngine
from headend.switching.journal import Admitted, Command, CommandJournal, CommandState
from headend.switching.policy import Decision, SwitchingPolicy
from headend.switching.runner import CommandRunner
from simulators.clock import ManualClock
from simulators.modbus_meter import ModbusSimulator, SimulatedMeter

MONDAY_10 = datetime(2026, 3, 9, 10, 0, tzinfo=UTC)
MAP = shipped_maps()["sim-relay-meter"]


@dataclass
class Line:
    sim: ModbusSimulator
    link: ModbusLink

    def meter(self, unit: int) -> SimulatedMeter:
        return self.sim.meters[unit]


@pytest.fixture
async def lines() -> AsyncIterator[dict[str, Line]]:
    """Two Modbus lines, A (units 1-8) and B (unit 1)."""
    out = {}
    for name, units in (("A", 8), ("B", 1)):
        sim = ModbusSimulator([SimulatedMeter(u, MAP, ManualClock(MONDAY_10)) for u in range(1, units + 1)])
        port = free_port()
        await sim.start_tcp("127.0.0.1", port)
        out[name] = Line(sim, ModbusLink.tcp("127.0.0.1", port, timeout=1))
    yield out
    for line in out.values():
        line.link.close()
        await line.sim.stop()


def site(lines: dict[str, Line], **switching: object) -> Config:
    return parse_config({
        "links": [{"id": n, "kind": "tcp", "protocol": "modbus-tcp", "host": "127.0.0.1", "port": 1} for n in lines],
        "meters": [{"id": f"{n}-{u}", "link": n, "address": u, "map": "sim-relay-meter",
                    **({"protected": True, "protection": "hospital"} if (n, u) == ("A", 8) else {})}
                   for n, line in lines.items() for u in line.sim.meters],
        "switching": switching,
    })  # fmt: skip


def engine(lines: dict[str, Line], tmp_path: Path, cfg: Config | None = None, **kwargs: object) -> SwitchingEngine:
    cfg = cfg or site(lines)

    def session(meter: str) -> object:
        name, unit = meter.split("-")
        return lines[name].link.session(meter, int(unit), MAP)

    options: dict[str, object] = {"confirm_timeout": 0.5, "poll_interval": 0.05, "now": lambda: MONDAY_10, **kwargs}
    return SwitchingEngine(CommandJournal(tmp_path / "journal.sqlite"), SwitchingPolicy(cfg.switching),
                           Registry(cfg), session, **options)  # type: ignore[arg-type]  # fmt: skip


async def test_a_payment_lost_in_a_crash_after_sent_is_sent_again(lines: dict[str, Line], tmp_path: Path) -> None:
    lines["A"].meter(1).set_relay(False)  # cut off earlier for arrears
    e = engine(lines, tmp_path)
    paid = e.request("A-1", RelayAction.RECONNECT, who="billing", why="payment_received PAY-1").command
    assert e.journal.claim(paid.id, "dead") is not None
    e.journal.transition(paid.id, CommandState.SENT, {"attempt": 1}, attempt=True, owner="dead")  # then killed
    e.journal.close()
    restarted = engine(lines, tmp_path)
    (found,) = restarted.recover()
    done = await restarted.reconfirm(found)
    assert done is not None and done.state == CommandState.CONFIRMED
    assert lines["A"].meter(1).relay_connected and lines["A"].meter(1).relay_writes == 1


async def test_reconnects_never_expire(lines: dict[str, Line], tmp_path: Path) -> None:
    e = engine(lines, tmp_path, deadline=0.0)
    lines["A"].meter(2).set_relay(False)
    paid = e.request("A-2", RelayAction.RECONNECT, who="billing", why="paid").command
    assert paid.expires_ns is None
    assert (await e.run(paid.id)).state == CommandState.CONFIRMED and lines["A"].meter(2).relay_connected


async def test_a_disconnect_is_not_retried_once_a_payment_waits(lines: dict[str, Line], tmp_path: Path) -> None:
    e = engine(lines, tmp_path, attempts=3)
    meter = lines["A"].meter(3)
    meter.faults.stuck_relay = True  # the first write does not move the contact (yet)
    off = e.request("A-3", RelayAction.DISCONNECT, who="anna", why="arrears").command
    running = asyncio.create_task(e.run(off.id))
    async with asyncio.timeout(10):
        while e.journal.get(off.id).state != CommandState.SENT:  # noqa: ASYNC110 - watching the journal
            await asyncio.sleep(0.01)
    paid = e.request("A-3", RelayAction.RECONNECT, who="billing", why="paid").command
    assert paid.state == CommandState.QUEUED
    meter.faults.stuck_relay = False
    done = await running
    assert done.state == CommandState.FAILED and done.reason_code == "failed" and "reconnect" in done.reason
    assert done.attempts == 1 and meter.relay_writes == 1, "no second disconnect after the payment"
    assert (await e.run(paid.id)).state == CommandState.CONFIRMED and meter.relay_connected


async def test_the_server_never_takes_over_a_commissioning_test(lines: dict[str, Line], tmp_path: Path) -> None:
    e = engine(lines, tmp_path)
    test = e.request("A-4", RelayAction.DISCONNECT, who="commissioning:eve", why="commissioning test").command
    assert e.journal.claim(test.id, "commissioning-process") is not None  # the test is under way elsewhere
    e.journal.close()
    server = engine(lines, tmp_path)
    assert server.recover() == []
    gone = server.journal.get(test.id)
    assert gone.state == CommandState.CANCELLED and gone.reason_code == "commissioning"
    assert lines["A"].meter(4).relay_writes == 0


async def test_an_unapproved_protected_disconnect_expires(lines: dict[str, Line], tmp_path: Path) -> None:
    now = [MONDAY_10]
    cfg = site(lines, protected_approval=True, max_defer="2d")
    e = engine(lines, tmp_path, cfg, now=lambda: now[0])
    asked = e.request("A-8", RelayAction.DISCONNECT, who="chief", why="court order", override_reason="order 7",
                      roles=frozenset({"override"})).command  # fmt: skip
    assert asked.state == CommandState.AWAITING_APPROVAL
    runner = CommandRunner(e)
    await runner.start()
    runner.submit(asked)
    now[0] = MONDAY_10 + timedelta(days=3)
    runner.clock_changed()
    async with asyncio.timeout(10):
        while e.journal.get(asked.id).state != CommandState.EXPIRED:  # noqa: ASYNC110 - the runner's timer
            await asyncio.sleep(0.01)
    await runner.stop()
    again = e.request("A-8", RelayAction.DISCONNECT, who="chief", why="court order", override_reason="order 7",
                      roles=frozenset({"override"})).command  # fmt: skip
    assert again.state == CommandState.AWAITING_APPROVAL, "the meter is not blocked by the stale request"
    assert lines["A"].meter(8).relay_writes == 0


async def test_a_link_whose_relays_hang_does_not_starve_the_others(lines: dict[str, Line], tmp_path: Path) -> None:
    for unit in range(1, 8):
        lines["A"].meter(unit).faults.stuck_relay = True
    e = engine(lines, tmp_path, confirm_timeout=1.0, attempts=2)
    runner = CommandRunner(e, workers=2)
    await runner.start()
    for unit in range(1, 8):
        runner.submit(e.request(f"A-{unit}", RelayAction.DISCONNECT, who="anna", why="arrears").command)
    healthy = e.request("B-1", RelayAction.DISCONNECT, who="anna", why="arrears").command
    runner.submit(healthy)
    async with asyncio.timeout(5):  # well before line A's seven commands (2 x 1 s each) are through
        while e.journal.get(healthy.id).state != CommandState.CONFIRMED:  # noqa: ASYNC110 - watching the journal
            await asyncio.sleep(0.01)
    assert not lines["B"].meter(1).relay_connected
    await runner.stop()


@pytest.mark.parametrize("paid_first", [True, False], ids=["paid-before-the-check", "paid-during-the-check"])
async def test_a_payment_during_a_retry_is_either_seen_by_its_check_or_admitted_after_sent(
    lines: dict[str, Line], tmp_path: Path, paid_first: bool
) -> None:
    """A disconnect's first attempt is sent but the relay sticks. As the retry's policy check
    runs in the journal thread, the customer pays: just before it, or during it (an API
    request queued in that thread). The check and `sent` are one journal step, so a payment
    is never admitted between them: either the check sees it (no retry) or the journal has
    the disconnect `sent` before the payment was `requested`, as if the payment came a moment
    later, and the reconnect runs next. When they were two steps, the retry was sent after
    the payment had been admitted (found by an attacker pass)."""
    e = engine(lines, tmp_path, attempts=3)
    meter = lines["A"].meter(3)
    meter.faults.stuck_relay = True  # the first write does not move the contact
    off = e.request("A-3", RelayAction.DISCONNECT, who="anna", why="arrears").command
    checks = 0
    recheck = e._recheck
    paid: list[concurrent.futures.Future[Admitted]] = []

    def recheck_while_paying(command: Command) -> Decision:
        nonlocal checks
        checks += 1
        if checks == 2:  # the retry's check, in the journal thread
            meter.faults.stuck_relay = False
            if paid_first:  # admitted by the step just before this one
                done: concurrent.futures.Future[Admitted] = concurrent.futures.Future()
                done.set_result(e.request("A-3", RelayAction.RECONNECT, who="billing", why="paid"))
                paid.append(done)
            else:  # queued in the thread while this step runs
                paid.append(e._journal_thread.submit(e.request, "A-3", RelayAction.RECONNECT, who="billing",
                                                     why="paid"))  # fmt: skip
        return recheck(command)

    e._recheck = recheck_while_paying  # type: ignore[method-assign]
    done = await e.run(off.id)
    reconnect = paid[0].result(10).command
    assert reconnect.state == CommandState.QUEUED  # the payment was taken on
    if paid_first:
        assert meter.relay_writes == 1, "the disconnect was sent again after the payment was admitted"
        assert done.state == CommandState.FAILED and "reconnect" in (done.reason or "")
    else:
        sent_at = max(ev.at_ns for ev in e.journal.events(off.id) if ev.state == CommandState.SENT)
        paid_at = min(ev.at_ns for ev in e.journal.events(reconnect.id) if ev.state == CommandState.REQUESTED)
        assert sent_at < paid_at, "the retry was sent after the payment was admitted"
        assert meter.relay_writes == 2 and done.state == CommandState.CONFIRMED
    e.close()


async def test_an_approval_queued_just_before_its_expiry_runs_the_command_once(lines: dict[str, Line],
                                                                              tmp_path: Path) -> None:  # fmt: skip
    """A protected customer's disconnect waits for a second principal. The approval reaches
    the journal thread just in time, and the runner's timer, seeing the deadline pass, queues
    the release behind it (both wait behind a slow step). The approval wins (it came first):
    the command is run once and the runner goes idle only when it is done, not filed as busy
    behind itself (then taken on again mid-run: a read-back racing its own run)."""
    now = [MONDAY_10]
    e = engine(lines, tmp_path, site(lines, protected_approval=True), now=lambda: now[0])
    runner = CommandRunner(e, tick=0.05, busy_retry=0.01)
    lines["A"].meter(8).faults.stuck_relay = True  # three attempts, each waiting out its read-back
    await runner.start()
    asked = e.request("A-8", RelayAction.DISCONNECT, who="anna", why="arrears", override_reason="ok by the board",
                      roles=frozenset({"operator", "override"})).command  # fmt: skip
    assert asked.state == CommandState.AWAITING_APPROVAL and asked.expires_ns is not None
    runner.submit(asked)
    deadline = datetime.fromtimestamp(asked.expires_ns / 1e9, UTC)

    def approve_in_time() -> Command:
        now[0] = deadline - timedelta(seconds=1)  # the approval's own clock: before the deadline
        try:
            return e.approve(asked.id, "chief", frozenset({"override"}))
        finally:
            now[0] = deadline + timedelta(seconds=1)

    async def approve_as_the_api_does() -> Command:
        command = await e.off_loop(approve_in_time)
        runner.submit(command)
        return command

    disk = threading.Event()
    slow = e._journal_thread.submit(disk.wait, 10)  # the journal thread busy with a slow fsync
    approving = asyncio.create_task(approve_as_the_api_does())
    await asyncio.sleep(0)  # the approval is queued in the thread
    now[0] = deadline + timedelta(seconds=1)
    runner.clock_changed()
    while asked.id in runner._waiting:  # noqa: ASYNC110 - the timer takes it and queues its release
        await asyncio.sleep(0.01)
    assert not runner._idle.is_set(), "join() would return while the command's release waits"
    disk.set()
    slow.result(10)
    assert (await approving).state == CommandState.QUEUED
    async with asyncio.timeout(10):
        await runner.join()
    done = e.journal.get(asked.id)
    assert done.state == CommandState.FAILED, f"the runner went idle with the command {done.state}"
    assert lines["A"].meter(8).relay_writes == 3 and done.attempts == 3
    await runner.stop()
    e.close()


async def test_a_stop_between_sent_and_the_relay_operation_still_operates_it(lines: dict[str, Line],
                                                                            tmp_path: Path) -> None:  # fmt: skip
    """The runner stops (serve shutting down) while a disconnect's go-ahead step (policy again,
    `sent` journaled) runs in the journal thread. The relay is still operated: a command
    journaled `sent` and never operated would be failed by the restart's read-back, where
    it should be confirmed or run again (found by an attacker pass)."""
    e = engine(lines, tmp_path)
    entered, go = threading.Event(), threading.Event()
    go_ahead = e._go_ahead

    def slow_go_ahead(*args: Any, **kwargs: Any) -> tuple[Command, bool]:
        entered.set()
        assert go.wait(10)
        return go_ahead(*args, **kwargs)

    e._go_ahead = slow_go_ahead  # type: ignore[method-assign]
    off = e.request("A-1", RelayAction.DISCONNECT, who="anna", why="arrears").command
    runner = CommandRunner(e)
    await runner.start()
    runner.submit(off)
    assert await asyncio.to_thread(entered.wait, 10)
    stopping = asyncio.create_task(runner.stop())
    for _ in range(5):  # the stop's cancellation reaches the worker while its step runs
        await asyncio.sleep(0)
    go.set()
    await stopping
    e.close()
    assert e.journal.get(off.id).state == CommandState.SENT
    assert lines["A"].meter(1).relay_writes == 1, "journaled sent, never operated"
    e.journal.close()
    restarted = engine(lines, tmp_path)
    (found,) = restarted.recover()
    assert (await restarted.reconfirm(found)).state == CommandState.CONFIRMED  # type: ignore[union-attr]
    restarted.close()


async def test_a_protected_disconnect_approved_outside_its_window_runs_when_the_window_opens(
    lines: dict[str, Line], tmp_path: Path
) -> None:
    """Approved at 07:00, before the day's disconnect window: the command waits for the
    window, not for the approval's deadline (it used to wait up to four days and expire)."""
    now = [MONDAY_10.replace(hour=7)]
    e = engine(lines, tmp_path, site(lines, protected_approval=True), now=lambda: now[0])
    runner = CommandRunner(e, tick=0.05)
    await runner.start()
    asked = e.request("A-8", RelayAction.DISCONNECT, who="anna", why="arrears", override_reason="board",
                      roles=frozenset({"operator", "override"})).command  # fmt: skip
    assert asked.state == CommandState.AWAITING_APPROVAL
    runner.submit(asked)
    approved = await e.off_loop(e.approve, asked.id, "chief", frozenset({"override"}))
    assert approved.state == CommandState.DEFERRED and approved.not_before_ns is not None
    runner.submit(approved)  # as the API does
    now[0] = datetime.fromtimestamp(approved.not_before_ns / 1e9, UTC)  # the window opens
    runner.clock_changed()
    async with asyncio.timeout(10):
        while e.journal.get(asked.id).state == CommandState.DEFERRED:  # noqa: ASYNC110 - the timer's turn
            await asyncio.sleep(0.01)
        await runner.join()
    assert e.journal.get(asked.id).state == CommandState.CONFIRMED
    assert lines["A"].meter(8).relay_writes == 1
    await runner.stop()
    e.close()


async def test_a_dry_run_ends_dry_run_ok_never_confirmed_and_the_relay_never_moves(
    lines: dict[str, Line], tmp_path: Path
) -> None:
    """Issue #21: a dry run ended `confirmed` with the relay never operated, and VEE counted the
    meter as disconnected. Also after a restart that finds the dry run `sent`."""
    e = engine(lines, tmp_path, dry_run=True)
    cut = e.request("A-1", RelayAction.DISCONNECT, who="anna", why="arrears test").command
    done = await e.run(cut.id)
    assert done.state == CommandState.DRY_RUN_OK and done.evidence["operated"] is False
    assert done.evidence["relay_after"] == "connected"
    assert lines["A"].meter(1).relay_connected and lines["A"].meter(1).relay_writes == 0
    left = e.request("A-2", RelayAction.DISCONNECT, who="anna", why="arrears test").command
    assert e.journal.claim(left.id, "dead") is not None
    e.journal.transition(left.id, CommandState.SENT, {"attempt": 1}, attempt=True, owner="dead")  # then killed
    e.journal.close()
    restarted = engine(lines, tmp_path, dry_run=True)
    (found,) = restarted.recover()
    after = await restarted.reconfirm(found)
    assert after is not None and after.state == CommandState.DRY_RUN_OK
    assert lines["A"].meter(2).relay_connected and lines["A"].meter(2).relay_writes == 0
