"""`headend serve` drains its outbox in a writer process of its own (issue #22). As deployed:
the writer process ends with serve, even when serve is killed, so a restarted serve takes
the outbox over at once; a writer process that dies is started again by serve, and neither
loses or doubles a reading."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from pathlib import Path

import aiomqtt

from headend.localservers import MosquittoServer, free_port
from headend.protocols.mqtt_schema import data_topic, state_topic
from tests.conftest import Spawn
from tests.serving import Served, issue_tokens
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
