"""Faults inside `headend serve` as deployed (issue #14): an exception injected into a
concentrator link or a writer hook is logged, counted and got over by the process itself; a
rogue that takes the head-end's MQTT client id (a broker without the ACL) costs a reconnect
and a re-read, never a reading; a DLMS meter that never stops sending blocks is cut off while
the others are read."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt

from headend.installation import installation_id
from headend.localservers import MosquittoServer, free_port
from headend.protocols.mqtt_schema import data_topic, state_topic
from simulators.clock import Clock, ManualClock
from simulators.dlms_meter import SimulatedDlmsMeter
from simulators.mqtt_concentrator import SimulatedConcentrator
from tests.conftest import Spawn
from tests.serving import Served, issue_tokens
from tests.sites import dlms_meter, tcp_link, write_site
from tests.test_mqtt_attacks_serve import concentrator_site, mosquitto_publish_clear, readings, rss_kib
from tests.test_mqtt_ingest_bounds import birth, message

START = datetime(2026, 3, 9, tzinfo=UTC)
QUARTER = timedelta(minutes=15)


async def serve_with_fault(tmp_path: Path, spawn: Spawn, body: str, fault: str | None) -> Served:
    api_port = free_port()
    write_site(tmp_path, api_port, body)
    served = Served(tmp_path, f"http://127.0.0.1:{api_port}", issue_tokens(tmp_path), spawn,
                    env={"HEADEND_TEST_FAULT": fault} if fault else {},
                    module="tests.fault_serve" if fault else "headend.cli")  # fmt: skip
    await served.start()
    return served


async def metric(served: Served, prefix: str) -> float:
    text = (await served.client.get("/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


async def stored_until(path: Path, wanted: int, timeout: float = 30) -> list[tuple[str, float]]:
    try:
        async with asyncio.timeout(timeout):
            while len(rows := readings(path)) < wanted:  # noqa: ASYNC110 - another process's store
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(f"{len(readings(path))} of {wanted} readings stored after {timeout} s") from None
    return rows


def interval_stamps(path: Path, meter: str) -> list[int]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return [ts // 10**9 for (ts,) in db.execute(
            "SELECT ts FROM readings WHERE kind = 'interval' AND meter = ? ORDER BY ts", (meter,))]  # fmt: skip


async def test_an_exception_in_a_concentrator_link_restarts_it_and_loses_nothing(
    tmp_path: Path, spawn: Spawn, mosquitto_server: MosquittoServer
) -> None:
    dc_id = f"dc-{uuid.uuid4().hex[:8]}"
    served = await serve_with_fault(tmp_path, spawn, concentrator_site(mosquitto_server.port, dc_id, ["M1"]),
                                    "headend.storage.outbox:Outbox.accept_series:1")  # fmt: skip
    try:
        async with aiomqtt.Client("127.0.0.1", mosquitto_server.port, identifier=f"pub-{dc_id}") as client:
            await client.publish(state_topic(dc_id), birth(0, 1, ["M1"]), qos=1, retain=True)
            await client.publish(data_topic(dc_id), message(1, "M1", value=1.5), qos=1)
        # The first commit fails inside the link; the broker hands the unacknowledged message
        # to the restarted link.
        assert await stored_until(tmp_path / "readings.sqlite", 1) == [("M1", 1.5)]
        assert await metric(served, 'headend_task_restarts_total{task="mqtt-link-') == 1
        assert (await served.client.get("/health")).status_code == 200
        await mosquitto_publish_clear(mosquitto_server.port, state_topic(dc_id))
    finally:
        await served.stop()


async def test_an_exception_in_a_writer_hook_is_counted_and_never_holds_data_back(
    tmp_path: Path, spawn: Spawn, mosquitto_server: MosquittoServer
) -> None:
    dc_id = f"dc-{uuid.uuid4().hex[:8]}"
    served = await serve_with_fault(tmp_path, spawn, concentrator_site(mosquitto_server.port, dc_id, ["M1"]),
                                    "headend.vee.arrival:ArrivalValidator.note_stored:1000")  # fmt: skip
    try:
        async with aiomqtt.Client("127.0.0.1", mosquitto_server.port, identifier=f"pub-{dc_id}") as client:
            await client.publish(state_topic(dc_id), birth(0, 1, ["M1"]), qos=1, retain=True)
            for seq in (1, 2):
                quarter = message(seq, "M1", value=seq / 2, at=START + seq * QUARTER)
                await client.publish(data_topic(dc_id), quarter, qos=1)
        assert sorted(await stored_until(tmp_path / "readings.sqlite", 2)) == [("M1", 0.5), ("M1", 1.0)]
        # The writer process tells serve what it stored after storing it: the hook runs then.
        async with asyncio.timeout(10):
            while await metric(served, "headend_writer_hook_failures ") < 1:  # noqa: ASYNC110 - another process
                await asyncio.sleep(0.02)
        assert await metric(served, "headend_outbox_depth ") == 0
        await mosquitto_publish_clear(mosquitto_server.port, state_topic(dc_id))
    finally:
        await served.stop()


async def test_a_rogue_taking_the_head_ends_client_id_costs_nothing_on_serve(
    tmp_path: Path, spawn: Spawn, mosquitto_server: MosquittoServer
) -> None:
    """Without the ACL (with it, `use_username_as_clientid` makes this impossible: see
    test_mqtt_security) a client can connect with the head-end's id and, with a clean start,
    throw away its queued session. The head-end reconnects, sees the seq gap and asks the
    concentrator for it again."""
    clock = ManualClock(START)
    dc_id = f"dc-{uuid.uuid4().hex[:8]}"
    meters = [f"{dc_id}-m0", f"{dc_id}-m1"]
    sim = SimulatedConcentrator(dc_id, "127.0.0.1", mosquitto_server.port, meters, clock)
    served = await serve_with_fault(tmp_path, spawn, concentrator_site(mosquitto_server.port, dc_id, meters), None)
    try:
        await sim.start()
        clock.advance(3600)
        await sim.publish_until(clock.datetime())  # 4 intervals per meter
        await stored_until(tmp_path / "readings.sqlite", 8)
        client_id = f"headend-{installation_id(tmp_path / 'state')}"
        connects = 'headend_mqtt_link_events_total{event="connects",link="broker"}'
        assert await metric(served, connects) == 1
        async with aiomqtt.Client("127.0.0.1", mosquitto_server.port, identifier=client_id, clean_start=True,
                                  protocol=aiomqtt.ProtocolVersion.V5):  # fmt: skip
            clock.advance(3600)
            await sim.publish_until(clock.datetime())  # published while the head-end is pushed off
        async with asyncio.timeout(30):
            while await metric(served, connects) < 2:  # noqa: ASYNC110 - another process's metrics
                await asyncio.sleep(0.05)
        clock.advance(900)
        await sim.publish_until(clock.datetime())  # the gap shows on this one
        await stored_until(tmp_path / "readings.sqlite", 18, timeout=60)
        end = int(clock.now())
        for meter in meters:  # every quarter hour up to the last one published, none missing
            stamps = interval_stamps(tmp_path / "readings.sqlite", meter)
            assert stamps == list(range(stamps[0], end + 1, 900)) and stamps[0] <= START.timestamp() + 900
        assert await metric(served, 'headend_mqtt_link_events_total{event="gaps",link="broker"}') >= 1
    finally:
        with contextlib.suppress(Exception):
            await sim.stop()
        await mosquitto_publish_clear(mosquitto_server.port, state_topic(dc_id))
        await served.stop()


async def test_a_meter_sending_blocks_forever_is_cut_off_and_the_others_are_read_on_serve(
    tmp_path: Path, spawn: Spawn
) -> None:
    clock = Clock()  # the server runs on the wall clock
    meters = {m: SimulatedDlmsMeter(m, clock) for m in ("D1", "D2", "D3")}
    meters["D3"].faults.endless_blocks = True
    ports = {m: await sim.start() for m, sim in meters.items()}
    body = "".join(tcp_link(f"link-{m}", "dlms-wrapper", port, "2s", session_deadline="3s")
                   + dlms_meter(m, f"link-{m}", "DLMS_PASSWORD", group="dlms") for m, port in ports.items()) + """
[[plans]]
id = "profiles"
select = { group = "dlms" }
read = ["clock", "profile"]
every = "10s"
history = "1h"
window = "1s"
"""
    api_port = free_port()
    write_site(tmp_path, api_port, body)
    served = Served(tmp_path, f"http://127.0.0.1:{api_port}", issue_tokens(tmp_path), spawn,
                    env={"DLMS_PASSWORD": "12345678"}, log_path=tmp_path / "serve.log")  # fmt: skip
    await served.start()
    assert served.proc is not None
    try:
        before = rss_kib(served.proc.pid)
        failed = 'headend_meter_reads_total{plan="profiles",result="failed"}'
        async with asyncio.timeout(60):
            while await metric(served, failed) < 1:  # noqa: ASYNC110 - another process's metrics
                await asyncio.sleep(0.2)
        assert await metric(served, 'headend_meter_reads_total{plan="profiles",result="ok"}') == 2
        assert {m for m, _ in readings(tmp_path / "readings.sqlite")} == {"D1", "D2"}
        assert rss_kib(served.proc.pid) - before < 60_000  # KiB: bounded by the byte cap, not by the meter
        log = (tmp_path / "serve.log").read_text()
        assert re.search(r"D3.*(no end in sight|session deadline \(3 s\) passed)", log), log[-2000:]
    finally:
        await served.stop()
        for sim in meters.values():
            await sim.stop()
