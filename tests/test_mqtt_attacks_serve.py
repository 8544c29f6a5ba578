"""A rogue client on the broker against `headend serve` as deployed (issue #14): forged relay
answers never confirm a reconnect, and data for a known meter published under another
concentrator never reaches the store (it is quarantined, counted)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import uuid
from datetime import timedelta
from pathlib import Path

import aiomqtt

from headend.localservers import MosquittoServer
from headend.model import RelayState
from headend.protocols.mqtt_schema import Block, Data, Point, data_topic, state_topic
from simulators.clock import Clock
from simulators.mqtt_concentrator import SimulatedConcentrator
from tests.conftest import Spawn
from tests.test_mqtt_ingest_bounds import T, birth, message
from tests.test_mqtt_security import ACL, forged, rogue
from tests.test_switching_serve import serve


def concentrator_site(port: int, dc_id: str, meters: list[str]) -> str:
    return f"""
[[links]]
id = "broker"
kind = "mqtt"
host = "127.0.0.1"
port = {port}
timeout = "5s"
[[concentrators]]
id = "{dc_id}"
link = "broker"
""" + "".join(f'[[meters]]\nid = "{m}"\nconcentrator = "{dc_id}"\n' for m in meters)


async def test_forged_relay_answers_never_confirm_a_reconnect_on_serve(
    tmp_path: Path, spawn: Spawn, mosquitto_server: MosquittoServer
) -> None:
    dc_id = f"dc-{uuid.uuid4().hex[:8]}"
    dc = SimulatedConcentrator(dc_id, "127.0.0.1", mosquitto_server.port, ["Q1"], Clock())
    dc.loads["Q1"].set_relay(False, dc.clock.now())
    dc.faults.stuck_relays.add("Q1")  # the relay will not close: only a forged answer could say it did
    await dc.start()
    served = await serve(tmp_path, spawn, concentrator_site(mosquitto_server.port, dc_id, ["Q1"]))
    try:
        async with rogue(mosquitto_server.port, forged(RelayState.CONNECTED)) as seen:
            r = await served.post("/billing/events", "billing", {"type": "payment_received", "meter": "Q1",
                                                                 "reference": "PAY-1"})  # fmt: skip
            assert r.status_code == 202
            done = await served.until(r.headers["Location"], timeout=60)
        assert seen, "the rogue read the commands (no ACL on this broker)"
        assert done["state"] == "failed" and not dc.loads["Q1"].relay_connected
        metrics = (await served.client.get("/metrics")).text
        assert 'headend_switching_commands{action="reconnect",state="confirmed"}' not in metrics
    finally:
        await served.stop()
        await dc.stop()


async def test_data_under_another_concentrators_name_never_reaches_the_store(
    tmp_path: Path, spawn: Spawn, mosquitto_server: MosquittoServer
) -> None:
    dc_id = f"dc-{uuid.uuid4().hex[:8]}"
    served = await serve(tmp_path, spawn, concentrator_site(mosquitto_server.port, dc_id, ["M1", "M2"]))
    try:
        async with aiomqtt.Client("127.0.0.1", mosquitto_server.port, identifier=f"pub-{dc_id}") as client:
            await client.publish(state_topic(dc_id), birth(0, 1, ["M1", "M2"]), qos=1, retain=True)
            await client.publish(data_topic("dc-rogue"), message(1, "M1", value=666.0), qos=1)  # unknown sender
            await client.publish(data_topic(dc_id), message(1, "M9", value=666.0), qos=1)  # not its meter
            await client.publish(data_topic(dc_id), message(1, "M1", value=1.5), qos=1)  # the genuine one
        async with asyncio.timeout(30):
            while (rows := readings(tmp_path / "readings.sqlite")) != [("M1", 1.5)]:  # noqa: ASYNC110
                await asyncio.sleep(0.2)  # polling another process's store until the genuine value is in
        assert rows == [("M1", 1.5)], "neither rogue value was stored"
        reasons = quarantine_reasons(tmp_path / "outbox.sqlite")
        assert any("dc-rogue is not a concentrator of this link" in r for r in reasons)
        assert any("'M9' not behind" in r for r in reasons)
        await mosquitto_publish_clear(mosquitto_server.port, state_topic(dc_id))
    finally:
        await served.stop()


def readings(path: Path) -> list[tuple[str, float]]:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            return list(db.execute("SELECT meter, value FROM readings WHERE kind = 'interval'"))
    except sqlite3.OperationalError:
        return []


def quarantine_reasons(outbox: Path) -> list[str]:
    """Why each row of a serve process's outbox quarantine is there."""
    with contextlib.closing(sqlite3.connect(outbox)) as db:
        return [r for (r,) in db.execute("SELECT reason FROM quarantine")]


async def mosquitto_publish_clear(port: int, topic: str) -> None:
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"clear-{uuid.uuid4().hex[:6]}") as client:
        await client.publish(topic, b"", qos=1, retain=True)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def test_a_seq_of_a_billion_is_quarantined_and_the_genuine_message_stored_on_serve(
    tmp_path: Path, spawn: Spawn, mosquitto_server: MosquittoServer
) -> None:
    dc_id = f"dc-{uuid.uuid4().hex[:8]}"
    served = await serve(tmp_path, spawn, concentrator_site(mosquitto_server.port, dc_id, ["M1"]))
    assert served.proc is not None
    try:
        async with aiomqtt.Client("127.0.0.1", mosquitto_server.port, identifier=f"pub-{dc_id}") as client:
            await client.publish(state_topic(dc_id), birth(0, 1, ["M1"]), qos=1, retain=True)
            await asyncio.sleep(0.5)
            before = rss_kib(served.proc.pid)
            await client.publish(data_topic(dc_id), message(10**9, "M1", value=666.0), qos=1)
            await client.publish(data_topic(dc_id), message(1, "M1", value=1.5), qos=1)
        async with asyncio.timeout(30):
            while readings(tmp_path / "readings.sqlite") != [("M1", 1.5)]:  # noqa: ASYNC110
                await asyncio.sleep(0.2)  # polling another process's store
        assert rss_kib(served.proc.pid) - before < 20_000
        assert (await served.client.get("/health")).status_code == 200
        reasons = quarantine_reasons(tmp_path / "outbox.sqlite")
        assert any("max_seq_gap" in r for r in reasons)
        await mosquitto_publish_clear(mosquitto_server.port, state_topic(dc_id))
    finally:
        await served.stop()


async def test_a_forged_retained_offline_does_not_hold_a_concentrator_offline_on_serve(
    tmp_path: Path, spawn: Spawn, mosquitto_server: MosquittoServer
) -> None:
    dc_id = f"dc-{uuid.uuid4().hex[:8]}"
    dc = SimulatedConcentrator(dc_id, "127.0.0.1", mosquitto_server.port, ["Q1"], Clock())
    await dc.start()
    served = await serve(tmp_path, spawn, concentrator_site(mosquitto_server.port, dc_id, ["Q1"]))
    try:
        offline = b'{"status": "offline", "bdseq": 1000000000000000}'
        async with aiomqtt.Client("127.0.0.1", mosquitto_server.port, identifier=f"pub-{dc_id}") as client:
            await client.publish(state_topic(dc_id), offline, qos=1, retain=True)
        r = await served.post("/billing/events", "billing", {"type": "payment_received", "meter": "Q1",
                                                             "reference": "PAY-2"})  # fmt: skip
        done = await served.until(r.headers["Location"], timeout=60)
        assert done["state"] == "confirmed", done.get("reason")
    finally:
        await served.stop()
        await dc.stop()


async def test_with_the_shipped_acl_a_rogue_reads_no_command_on_serve(tmp_path: Path, spawn: Spawn) -> None:
    users = {"headend": "he-secret", "dc-acl": "dc-secret", "dc-rogue": "rogue-secret"}
    broker = MosquittoServer(tmp_path / "broker", acl_file=ACL, users=users)
    broker.start()
    dc = SimulatedConcentrator("dc-acl", "127.0.0.1", broker.port, ["Q1"], Clock(), username="dc-acl",
                               password="dc-secret")  # fmt: skip
    dc.loads["Q1"].set_relay(False, dc.clock.now())
    await dc.start()
    site = concentrator_site(broker.port, "dc-acl", ["Q1"]).replace(
        'kind = "mqtt"', 'kind = "mqtt"\nusername = "headend"\npassword_env = "BROKER_PASSWORD"')
    served = await serve(tmp_path, spawn, site, BROKER_PASSWORD="he-secret")
    try:
        async with rogue(broker.port, forged(RelayState.CONNECTED, "headend/v1/dc/dc-acl/resp"),
                         username="dc-rogue", password="rogue-secret") as seen:  # fmt: skip
            r = await served.post("/billing/events", "billing", {"type": "payment_received", "meter": "Q1",
                                                                 "reference": "PAY-3"})  # fmt: skip
            done = await served.until(r.headers["Location"], timeout=60)
        assert seen == [], "the ACL keeps the commands from the rogue"
        assert done["state"] == "confirmed" and dc.loads["Q1"].relay_connected
    finally:
        await served.stop()
        await dc.stop()
        broker.stop()


async def test_a_poisoned_message_is_quarantined_and_never_stops_the_link_on_serve(
    tmp_path: Path, spawn: Spawn, mosquitto_server: MosquittoServer
) -> None:
    """A time that does not convert to UTC (year 9999 at -23:59) once crashed the link before
    its ack, again at every redelivery: ingest stopped for good. Now that message is kept
    aside with the reason and the genuine ones after it are stored, with no restart."""
    dc_id = f"dc-{uuid.uuid4().hex[:8]}"
    served = await serve(tmp_path, spawn, concentrator_site(mosquitto_server.port, dc_id, ["M1"]))
    poison = message(1, "M1", value=9.0).replace(b'"2026-03-09T10:15:00Z"', b'"9999-12-31T23:59:59-23:59"')
    assert b"9999" in poison
    try:
        async with aiomqtt.Client("127.0.0.1", mosquitto_server.port, identifier=f"pub-{dc_id}") as client:
            await client.publish(state_topic(dc_id), birth(0, 1, ["M1"]), qos=1, retain=True)
            await client.publish(data_topic(dc_id), poison, qos=1)
            await client.publish(data_topic(dc_id), message(1, "M1", value=1.5), qos=1)
        async with asyncio.timeout(30):
            while readings(tmp_path / "readings.sqlite") != [("M1", 1.5)]:  # noqa: ASYNC110
                await asyncio.sleep(0.1)  # polling another process's store
        metrics = (await served.client.get("/metrics")).text
        assert "headend_task_restarts_total" not in metrics or 'task="mqtt-link' not in metrics
        reasons = quarantine_reasons(tmp_path / "outbox.sqlite")
        assert any("9999-12-31T23:59:59-23:59" in r for r in reasons), reasons
        await mosquitto_publish_clear(mosquitto_server.port, state_topic(dc_id))
    finally:
        await served.stop()


async def test_a_flood_of_garbage_keeps_memory_bounded_and_genuine_data_flowing_on_serve(
    tmp_path: Path, spawn: Spawn, mosquitto_server: MosquittoServer
) -> None:
    """100,000 distinct garbage messages at QoS 0 with 100 genuine QoS 1 ones among them, 20
    messages of 3 MB (past the head-end's Maximum Packet Size: the broker drops them), and a
    message with 5,000 blocks for meters that are not the concentrator's: RSS grows by tens
    of MB, not by the flood (it grew by 2 GB before); no QoS 1 message is dropped (a dropped
    one is never acked and, a thousand of them, stall ingest); the refused blocks are one
    quarantine row; a genuine message sent after the flood is stored."""
    dc_id = f"dc-{uuid.uuid4().hex[:8]}"
    served = await serve(tmp_path, spawn, concentrator_site(mosquitto_server.port, dc_id, ["M1"]))
    assert served.proc is not None
    try:
        async with aiomqtt.Client("127.0.0.1", mosquitto_server.port, identifier=f"pub-{dc_id}",
                                  max_queued_outgoing_messages=0) as client:  # fmt: skip
            await client.publish(state_topic(dc_id), birth(0, 1, ["M1"]), qos=1, retain=True)
            await client.publish(data_topic(dc_id), message(1, "M1", value=1.5), qos=1)
            async with asyncio.timeout(30):
                while readings(tmp_path / "readings.sqlite") != [("M1", 1.5)]:  # noqa: ASYNC110
                    await asyncio.sleep(0.1)  # polling another process's store
            before = rss_kib(served.proc.pid)
            peak = before
            for n in range(100_000):
                await client.publish(data_topic(dc_id), b"garbage %d " % n + b"x" * 180, qos=0)
                if n % 1000 == 999:  # genuine QoS 1 data all through the flood: none may be dropped
                    k = n // 1000 + 1
                    genuine = message(100 + k, "M1", value=float(k), at=T - k * timedelta(minutes=15))
                    await client.publish(data_topic(dc_id), genuine, qos=1)
                if n % 5000 == 0:
                    peak = max(peak, rss_kib(served.proc.pid))
            for _ in range(20):
                await client.publish(data_topic(dc_id), b"{" + b" " * (3 << 20) + b"}", qos=1)
            blocks = [Block(meter=f"X{i}", kind="interval", channel="1-0:1.29.0.255", unit="kWh", interval_s=900,
                            readings=[Point(t=T, v=1.0)]) for i in range(5_000)]  # fmt: skip
            many = Data(seq=2, blocks=blocks)
            await client.publish(data_topic(dc_id), many.model_dump_json(), qos=1)
            await client.publish(data_topic(dc_id), message(3, "M1", value=2.5, at=T + timedelta(minutes=15)), qos=1)
            async with asyncio.timeout(120):
                while len(readings(tmp_path / "readings.sqlite")) < 102:
                    peak = max(peak, rss_kib(served.proc.pid))
                    await asyncio.sleep(0.2)  # polling another process's store
        stored = sorted(v for _m, v in readings(tmp_path / "readings.sqlite"))
        assert stored == sorted([1.5, 2.5, *(float(k) for k in range(1, 101))]), "every QoS 1 message stored"
        assert peak - before < 150_000, f"RSS grew by {(peak - before) // 1024} MiB"  # KiB
        refused = [r for r in quarantine_reasons(tmp_path / "outbox.sqlite") if "blocks refused" in r]
        assert len(refused) == 1 and refused[0].startswith("5000 blocks refused: meter 'X0'"), refused
        await mosquitto_publish_clear(mosquitto_server.port, state_topic(dc_id))
    finally:
        await served.stop()
