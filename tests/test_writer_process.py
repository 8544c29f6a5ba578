"""`headend serve` drains its outbox in a writer process of its own (issue #22). As deployed:
the writer process ends with serve, even when serve is killed, so a restarted serve takes
the outbox over at once; a writer process that dies is started again by serve, and neither
loses or doubles a reading."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
import time
import uuid
from pathlib import Path

import aiomqtt

from headend.config import StorageConfig
from headend.localservers import MosquittoServer, free_port
from headend.model import IMPORT_INTERVAL, Reading
from headend.protocols.mqtt_schema import data_topic, state_topic
from headend.storage.outbox import Outbox
from headend.storage.writer_process import WriterJob, WriterProcess
from tests.conftest import Spawn
from tests.factories import intervals
from tests.serving import ROOT, Served, issue_tokens
from tests.sites import write_site
from tests.test_faults_serve import QUARTER, START, metric, stored_until
from tests.test_mqtt_attacks_serve import concentrator_site, mosquitto_publish_clear
from tests.test_mqtt_ingest_bounds import birth, message


def writer_processes(parent: int) -> list[int]:
    """Pids of the writer processes whose parent is `parent`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent and b"headend.storage.writer_child" in cmdline:
                found.append(int(entry))
    return found


async def writer_of(served: Served) -> int:
    """The writer process serve started (it starts with serve, before the API answers)."""
    assert served.proc is not None
    (pid,) = writer_processes(served.proc.pid)
    return pid


async def ended(pid: int, timeout: float = 10) -> None:
    """Wait for a process that is not our child to end (its pidfd becomes readable)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    gone = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(fd, gone.set)
    try:
        async with asyncio.timeout(timeout):
            await gone.wait()
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def until_metric(served: Served, prefix: str, value: float, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while await metric(served, prefix) != value:  # noqa: ASYNC110 - another process's figures
            await asyncio.sleep(0.05)


async def start(tmp_path: Path, spawn: Spawn, body: str) -> Served:
    port = free_port()
    write_site(tmp_path, port, body)
    served = Served(tmp_path, f"http://127.0.0.1:{port}", issue_tokens(tmp_path), spawn)
    await served.start()
    return served


async def publish(port: int, dc_id: str, seqs: range) -> None:
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"pub-{dc_id}-{seqs.start}") as client:
        await client.publish(state_topic(dc_id), birth(0, 1, ["M1"]), qos=1, retain=True)
        for seq in seqs:
            await client.publish(data_topic(dc_id), message(seq, "M1", value=seq / 4, at=START + seq * QUARTER), qos=1)


async def test_a_killed_serve_takes_its_writer_process_with_it_and_the_next_serve_drains_the_outbox(
    tmp_path: Path, spawn: Spawn, mosquitto_server: MosquittoServer
) -> None:
    dc_id = f"dc-{uuid.uuid4().hex[:8]}"
    body = concentrator_site(mosquitto_server.port, dc_id, ["M1"])
    served = await start(tmp_path, spawn, body)
    writer = await writer_of(served)
    await publish(mosquitto_server.port, dc_id, range(1, 3))
    assert len(await stored_until(tmp_path / "readings.sqlite", 2)) == 2
    await served.kill()  # SIGKILL: serve has no say in it
    await served.client.aclose()
    await ended(writer)  # the writer process saw serve's end of its pipe close and ended too

    again = Served(tmp_path, served.url, served.tokens, spawn)
    await again.start()  # would fail on the outbox's writer lock if the old writer still held it
    try:
        await publish(mosquitto_server.port, dc_id, range(3, 5))
        rows = await stored_until(tmp_path / "readings.sqlite", 4)
        assert sorted(rows) == [("M1", 0.25), ("M1", 0.5), ("M1", 0.75), ("M1", 1.0)]
        await mosquitto_publish_clear(mosquitto_server.port, state_topic(dc_id))
    finally:
        await again.stop()


async def test_a_writer_process_that_dies_is_started_again_and_nothing_is_lost(
    tmp_path: Path, spawn: Spawn, mosquitto_server: MosquittoServer
) -> None:
    dc_id = f"dc-{uuid.uuid4().hex[:8]}"
    served = await start(tmp_path, spawn, concentrator_site(mosquitto_server.port, dc_id, ["M1"]))
    try:
        await publish(mosquitto_server.port, dc_id, range(1, 3))
        assert len(await stored_until(tmp_path / "readings.sqlite", 2)) == 2
        await until_metric(served, "headend_writer_written_readings ", 2)
        first = await writer_of(served)
        os.kill(first, signal.SIGKILL)
        await ended(first)
        await publish(mosquitto_server.port, dc_id, range(3, 5))
        rows = await stored_until(tmp_path / "readings.sqlite", 4)
        assert sorted(rows) == [("M1", 0.25), ("M1", 0.5), ("M1", 0.75), ("M1", 1.0)]
        assert await metric(served, 'headend_task_restarts_total{task="outbox-writer"}') == 1
        assert await writer_of(served) != first
        # Counted across both writer processes, not from zero again.
        await until_metric(served, "headend_writer_written_readings ", 4)
        await mosquitto_publish_clear(mosquitto_server.port, state_topic(dc_id))
    finally:
        await served.stop()


async def test_serve_stopped_as_usual_leaves_no_writer_process(
    tmp_path: Path, spawn: Spawn, mosquitto_server: MosquittoServer
) -> None:
    dc_id = f"dc-{uuid.uuid4().hex[:8]}"
    served = await start(tmp_path, spawn, concentrator_site(mosquitto_server.port, dc_id, ["M1"]))
    writer = await writer_of(served)
    await publish(mosquitto_server.port, dc_id, range(1, 2))
    await stored_until(tmp_path / "readings.sqlite", 1)
    await mosquitto_publish_clear(mosquitto_server.port, state_topic(dc_id))
    await served.stop()  # SIGTERM: drains, then closes the writer's pipe
    await ended(writer)


# The attacker pass on the writer process (issue #22): what broke then, and what held.


def storage(tmp_path: Path, **writer: object) -> StorageConfig:
    return StorageConfig.model_validate(
        {"backend": "sqlite", "outbox": tmp_path / "outbox.sqlite", "sqlite": {"path": tmp_path / "readings.sqlite"},
         "writer": writer})  # fmt: skip


def stored(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return int(db.execute("SELECT count(*) FROM readings").fetchone()[0])


async def next_writer(served: Served, old: int, timeout: float = 30) -> int:
    assert served.proc is not None
    async with asyncio.timeout(timeout):
        while not (found := [pid for pid in writer_processes(served.proc.pid) if pid != old]):  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # another process's children
    return found[0]


async def test_a_batch_of_many_meters_with_long_unicode_ids_reaches_vee_whole(tmp_path: Path) -> None:
    """25,000 meters of 64 astral characters in one batch: what the batch stored is told to
    serve in many short lines, never one line too long for it."""
    meters = [f"{chr(0x1D510) * 58}{i:06d}" for i in range(25_000)]
    cfg = storage(tmp_path, batch_size=30_000)
    outbox = Outbox(cfg.outbox)
    outbox.lock_for_writer()
    outbox.accept_sync(Reading(meter=m, channel=IMPORT_INTERVAL, timestamp=START + QUARTER, value=1.0, unit="kWh")
                       for m in meters)  # fmt: skip
    seen: set[str] = set()
    writer = WriterProcess(outbox, WriterJob(cfg, None), on_days=lambda days: seen.update(days))
    task = asyncio.create_task(writer.run())
    try:
        async with asyncio.timeout(120):
            await writer.wait_drained()
            while len(seen) < len(meters):  # noqa: ASYNC110 - the last lines may follow "drained"
                await asyncio.sleep(0.05)
    finally:
        writer.stop()
        await task
        outbox.close()
    assert stored(tmp_path / "readings.sqlite") == len(meters) and writer.restarts == 0 and writer.bad_lines == 0


async def test_readings_a_killed_writer_process_stored_are_counted(tmp_path: Path) -> None:
    """Killed right after a batch, before it told serve: the count is the outbox's, kept with
    the deletions, so /metrics still says every reading written."""
    cfg = storage(tmp_path)
    outbox = Outbox(cfg.outbox)
    outbox.lock_for_writer()
    writer = WriterProcess(outbox, WriterJob(cfg, None), min_pause=0.05)
    task = asyncio.create_task(writer.run())
    me, killed = os.getpid(), set()
    try:
        for round_ in range(3):
            async with asyncio.timeout(30):
                while not (pids := [p for p in writer_processes(me) if p not in killed]):  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
                await writer.wait_drained()
                await outbox.accept(list(intervals(round_, 0, 100)))
                while outbox.depth():  # noqa: ASYNC110 - settled by the other process
                    await asyncio.sleep(0.001)
            os.kill(pids[0], signal.SIGKILL)
            killed.add(pids[0])
            await ended(pids[0])
        async with asyncio.timeout(10):
            while writer.alive or writer.restarts < 3:  # noqa: ASYNC110 - its end is seen by the reader task
                await asyncio.sleep(0.01)
        assert stored(tmp_path / "readings.sqlite") == 300 and writer.stats.written == 300
    finally:
        writer.stop()
        await task
        outbox.close()


async def test_a_writer_process_killed_again_and_again_shows_unhealthy_and_never_slows_a_stop(
    tmp_path: Path, spawn: Spawn, mosquitto_server: MosquittoServer
) -> None:
    dc_id = f"dc-{uuid.uuid4().hex[:8]}"
    served = await start(tmp_path, spawn, concentrator_site(mosquitto_server.port, dc_id, ["M1"]))
    try:
        writer = await writer_of(served)
        for _ in range(3):  # the OOM killer, an operator: the pause before the next one doubles
            os.kill(writer, signal.SIGKILL)
            await ended(writer)
            writer = await next_writer(served, writer)
        os.kill(writer, signal.SIGKILL)
        await ended(writer)
        auditor = {"Authorization": f"Bearer {served.tokens['auditor']}"}
        async with asyncio.timeout(10):
            while (await served.client.get("/status", headers=auditor)).json()["writer"]["healthy"]:  # noqa: ASYNC110
                await asyncio.sleep(0.02)  # polling another process's API
        assert await metric(served, 'headend_task_restarts_total{task="outbox-writer"}') == 4
        await mosquitto_publish_clear(mosquitto_server.port, state_topic(dc_id))
        assert served.proc is not None
        began = time.monotonic()
        served.proc.terminate()  # in the middle of the pause: it is cut short
        await asyncio.wait_for(served.proc.wait(), 30)
        assert time.monotonic() - began < 3 and served.proc.returncode == 0
    finally:
        await served.stop()


async def test_a_stop_signal_to_the_whole_group_while_the_writer_process_starts_leaves_it_to_serve(
    tmp_path: Path, spawn: Spawn, mosquitto_server: MosquittoServer
) -> None:
    """systemd (KillMode=control-group) and a terminal's Ctrl-C signal every process of the
    group: the writer process ignores them from its first line and ends when serve lets it."""
    dc_id = f"dc-{uuid.uuid4().hex[:8]}"
    write_site(tmp_path, free_port(), concentrator_site(mosquitto_server.port, dc_id, ["M1"]))
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = await spawn(sys.executable, "-m", "headend.cli", "serve", "--config", str(tmp_path / "site.toml"),
                           cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=log,
                           start_new_session=True)  # fmt: skip
    async with asyncio.timeout(30):
        while not (writers := writer_processes(proc.pid)):  # noqa: ASYNC110 - another process's child
            await asyncio.sleep(0.005)
    os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(ProcessLookupError):  # its own group: a terminal's signals miss it
        os.killpg(writers[0], signal.SIGTERM)
    await asyncio.wait_for(proc.wait(), 30)
    await ended(writers[0])
    assert proc.returncode == 0
    assert "writer process ended" not in log_path.read_text()


async def test_serve_killed_mid_batch_and_started_again_at_once_never_has_two_writers(
    tmp_path: Path, spawn: Spawn, mosquitto_server: MosquittoServer
) -> None:
    dc_id = f"dc-{uuid.uuid4().hex[:8]}"
    outbox = Outbox(tmp_path / "outbox.sqlite")
    for meter in range(100):  # a backlog the writer takes a moment to drain
        outbox.accept_sync(intervals(meter, 0, 96 * 20))
    total = outbox.depth()
    outbox.close()
    first = await start(tmp_path, spawn, concentrator_site(mosquitto_server.port, dc_id, ["M1"]))
    old = await writer_of(first)
    store = tmp_path / "readings.sqlite"
    async with asyncio.timeout(30):
        while not store.exists() or stored(store) < 20_000:  # noqa: ASYNC110 - another process's store
            await asyncio.sleep(0.02)
    await first.kill()  # mid-drain
    await first.client.aclose()
    again = Served(tmp_path, first.url, first.tokens, spawn)
    await again.start()  # at once
    try:
        with contextlib.suppress(OSError):  # gone, or a zombie nobody reaped yet
            state = Path(f"/proc/{old}/stat").read_text().rsplit(")", 1)[1].split()[0]  # noqa: ASYNC240
            assert state == "Z", f"the old writer process still runs beside the new serve (state {state})"
        outbox = Outbox(tmp_path / "outbox.sqlite")
        try:
            async with asyncio.timeout(60):
                while outbox.depth():  # noqa: ASYNC110 - drained by the new serve's writer process
                    await asyncio.sleep(0.05)
        finally:
            outbox.close()
        assert stored(store) == total
        await mosquitto_publish_clear(mosquitto_server.port, state_topic(dc_id))
    finally:
        await again.stop()


async def test_a_value_the_writer_process_finds_conflicting_shows_in_status_and_the_day_is_validated(
    tmp_path: Path, spawn: Spawn, mosquitto_server: MosquittoServer
) -> None:
    dc_id = f"dc-{uuid.uuid4().hex[:8]}"
    served = await start(tmp_path, spawn, concentrator_site(mosquitto_server.port, dc_id, ["M1"]))
    try:
        async with aiomqtt.Client("127.0.0.1", mosquitto_server.port, identifier=f"pub-{dc_id}") as client:
            await client.publish(state_topic(dc_id), birth(0, 1, ["M1"]), qos=1, retain=True)
            await client.publish(data_topic(dc_id), message(1, "M1", value=1.0, at=START + QUARTER), qos=1)
            await client.publish(data_topic(dc_id), message(2, "M1", value=1.0, at=START + 2 * QUARTER), qos=1)
            await stored_until(tmp_path / "readings.sqlite", 2)
            await client.publish(data_topic(dc_id), message(3, "M1", value=7.0, at=START + QUARTER), qos=1)
        auditor = {"Authorization": f"Bearer {served.tokens['auditor']}"}
        async with asyncio.timeout(15):
            while True:
                vee = (await served.client.get("/status", headers=auditor)).json()["vee"]
                if vee["conflicting_values"] >= 1 and vee["validated_on_arrival"] >= 1:
                    break
                await asyncio.sleep(0.05)  # polling another process's API
        await mosquitto_publish_clear(mosquitto_server.port, state_topic(dc_id))
    finally:
        await served.stop()
