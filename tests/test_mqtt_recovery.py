"""Nothing lost over MQTT: a head-end killed before its commit, and a broker restart."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from headend.localservers import MosquittoServer
from headend.protocols.mqtt import ConcentratorLink
from headend.storage.outbox import Outbox
from simulators.clock import ManualClock
from simulators.mqtt_concentrator import SimulatedConcentrator
from tests.conftest import Spawn
from tests.factories import T0

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def own_mosquitto(tmp_path: Path) -> Iterator[MosquittoServer]:
    server = MosquittoServer(tmp_path / "mosquitto")
    server.start()
    yield server
    server.stop()


Worker = Callable[..., Awaitable[asyncio.subprocess.Process]]


@pytest.fixture
def start_worker(spawn: Spawn) -> Worker:
    async def start(*args: str) -> asyncio.subprocess.Process:
        return await spawn(
            sys.executable, "-m", "tests.mqtt_worker", *args,
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip

    return start


async def read_until(proc: asyncio.subprocess.Process, line: str) -> None:
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        while True:
            got = (await proc.stdout.readline()).decode().strip()
            if got == line:
                return
            if not got and proc.stdout.at_eof():
                raise AssertionError(f"worker exited before printing {line!r}")


async def test_a_head_end_killed_before_its_commit_gets_the_messages_again(
    tmp_path: Path, mosquitto_server: MosquittoServer, start_worker: Worker
) -> None:
    clock = ManualClock(T0)
    headend_id = f"he-{uuid.uuid4().hex[:8]}"
    common = ["--port", str(mosquitto_server.port), "--headend-id", headend_id, "--outbox", str(tmp_path / "o.sqlite")]
    worker = await start_worker(*common, "--freeze")
    await read_until(worker, "CONNECTED")
    sim = SimulatedConcentrator(
        f"dc-{uuid.uuid4().hex[:8]}", "127.0.0.1", mosquitto_server.port, ["a", "b", "c"], clock
    )
    await sim.start()
    clock.advance(900)
    await sim.publish_until(clock.datetime())  # 3 messages, QoS 1; the broker has them
    await read_until(worker, "RECEIVED")  # frozen inside the first accept: nothing committed, nothing acked
    worker.kill()
    await worker.wait()
    outbox = Outbox(tmp_path / "o.sqlite")
    assert outbox.depth() == 0

    worker = await start_worker(*common)
    await read_until(worker, "ACCEPTED 3")  # the broker delivered all three again
    worker.kill()
    await worker.wait()
    readings = [r for p in outbox.take_sync(100) for r in p.readings]
    assert sorted(r.meter for r in readings if r) == ["a", "b", "c"]
    outbox.close()
    await sim.stop()


async def test_the_link_reconnects_by_itself_after_a_broker_restart(
    tmp_path: Path, own_mosquitto: MosquittoServer
) -> None:
    clock = ManualClock(T0)
    outbox = Outbox(tmp_path / "o.sqlite")
    sim = SimulatedConcentrator("dc-restart", "127.0.0.1", own_mosquitto.port, ["a", "b"], clock)
    async with ConcentratorLink(
        "127.0.0.1", own_mosquitto.port, outbox, headend_id="he-restart", reconnect_min=0.1, reconnect_max=0.5
    ) as link:
        await link.connected.wait()
        await sim.start()
        clock.advance(900)
        await sim.publish_until(clock.datetime())
        await link.until(lambda: link.stats.accepted_readings == 2)

        await asyncio.to_thread(own_mosquitto.stop)
        await link.until(lambda: not link.connected.is_set())
        await sim.crash()
        await asyncio.to_thread(own_mosquitto.start)
        async with asyncio.timeout(30):
            await link.connected.wait()
        assert link.stats.connects == 2

        await sim.start()
        clock.advance(900)
        await sim.publish_until(clock.datetime())
        await link.until(lambda: link.stats.accepted_readings == 4)
        assert link.concentrators["dc-restart"].watermark == 1
        await sim.stop()
    assert outbox.depth() == 4
    outbox.close()


def distinct_readings(path: Path) -> set[tuple[str, str]]:
    outbox = Outbox(path)
    try:
        return {(r.meter, r.timestamp.isoformat()) for p in outbox.take_sync(1_000_000) for r in p.readings}
    finally:
        outbox.close()


async def test_a_head_end_killed_mid_stream_and_restarted_loses_nothing(
    tmp_path: Path, mosquitto_server: MosquittoServer, start_worker: Worker
) -> None:
    clock = ManualClock(T0)
    run = uuid.uuid4().hex[:6]
    outbox_path = tmp_path / "o.sqlite"
    common = ["--port", str(mosquitto_server.port), "--headend-id", f"he-{run}", "--outbox", str(outbox_path)]
    worker = await start_worker(*common)
    await read_until(worker, "CONNECTED")
    fleet = [
        SimulatedConcentrator(f"dc{k}-{run}", "127.0.0.1", mosquitto_server.port,
                              [f"dc{k}-{run}-m{n:02d}" for n in range(50)], clock, meters_per_message=10)
        for k in range(2)
    ]  # fmt: skip
    for dc in fleet:
        await dc.start()
    clock.advance(86_400)
    stream = asyncio.gather(*(dc.publish_until(clock.datetime()) for dc in fleet))
    await read_until_at_least(worker, 2000)  # mid-stream: some committed, most still coming
    worker.kill()
    await worker.wait()
    await stream  # the concentrators finish their day; the broker queues it for the session
    assert 0 < len(distinct_readings(outbox_path)) < 2 * 50 * 96

    worker = await start_worker(*common)
    await read_until_total(outbox_path, worker, 2 * 50 * 96)
    worker.kill()
    await worker.wait()
    for dc in fleet:
        await dc.stop()


async def read_until_at_least(proc: asyncio.subprocess.Process, n: int) -> None:
    assert proc.stdout is not None
    async with asyncio.timeout(60):
        while True:
            line = (await proc.stdout.readline()).decode()
            if line.startswith("ACCEPTED") and int(line.split()[1]) >= n:
                return
            if not line:
                raise AssertionError("worker exited")


async def read_until_total(outbox_path: Path, proc: asyncio.subprocess.Process, total: int) -> None:
    """Follow the worker's accepts until the outbox holds `total` distinct readings."""
    assert proc.stdout is not None
    async with asyncio.timeout(60):
        while len(distinct_readings(outbox_path)) < total:
            line = await proc.stdout.readline()
            if not line:
                raise AssertionError(f"worker exited with {len(distinct_readings(outbox_path))} of {total}")


async def test_a_broker_restart_mid_stream_loses_nothing(tmp_path: Path, own_mosquitto: MosquittoServer) -> None:
    clock = ManualClock(T0)
    outbox = Outbox(tmp_path / "o.sqlite")
    meters = [f"m{n:02d}" for n in range(20)]
    sim = SimulatedConcentrator("dc-mid", "127.0.0.1", own_mosquitto.port, meters, clock, meters_per_message=5)
    async with ConcentratorLink(
        "127.0.0.1",
        own_mosquitto.port,
        outbox,
        headend_id="he-mid",
        reconnect_min=0.1,
        reconnect_max=0.5,
        gap_grace=0.5,
    ) as link:
        await link.connected.wait()
        await sim.start()
        await link.until(lambda: "dc-mid" in link.concentrators)
        clock.advance(6 * 3600)
        await sim.publish_until(clock.datetime())  # the first 6 hours
        await link.until(lambda: link.stats.accepted_readings > 0)
        await asyncio.to_thread(own_mosquitto.stop)  # the broker goes away mid-stream
        clock.advance(6 * 3600)
        await sim.publish_until(clock.datetime())  # the concentrator buffers what it cannot send
        await asyncio.to_thread(own_mosquitto.start)
        async with asyncio.timeout(30):
            await link.connected.wait()
        await sim.start()  # reconnects; its birth tells the head-end how far it got
        clock.advance(12 * 3600)
        await sim.publish_until(clock.datetime())
        await link.until(lambda: link.concentrators["dc-mid"].watermark == sim.seq, timeout=30)
        await sim.stop()
    got = {(r.meter, r.timestamp) for p in outbox.take_sync(1_000_000) for r in p.readings}
    assert len(got) == 20 * 96
    assert link.stats.backfills >= 1
    outbox.close()


async def test_the_concentrator_simulator_runs_as_its_own_process(
    tmp_path: Path, mosquitto_server: MosquittoServer
) -> None:
    outbox = Outbox(tmp_path / "o.sqlite")
    async with ConcentratorLink(
        "127.0.0.1", mosquitto_server.port, outbox, headend_id=f"he-{uuid.uuid4().hex[:6]}"
    ) as link:
        await link.connected.wait()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "simulators.mqtt_concentrator", "--broker", f"127.0.0.1:{mosquitto_server.port}",
            "--concentrators", "2", "--meters", "3", "--backlog-days", "0.25", "--start-delay", "0.5",
            cwd=ROOT, stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            await link.until(lambda: link.stats.accepted_readings >= 2 * 3 * 24)
            assert {c for c, s in link.concentrators.items() if s.online} >= {"dc-000", "dc-001"}
        finally:
            proc.terminate()
            await proc.wait()
        await link.until(lambda: not link.concentrators["dc-000"].online)  # its Will, as the process died
    outbox.close()
