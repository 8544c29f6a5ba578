"""Switching you can trust, against `headend serve` as a process and simulated meters that
count every relay operation: a payment beats a queued disconnect, retries never switch
twice, protected customers need an explicit override (and a second person), a kill in the
middle of a bulk run or with concentrator commands in flight never operates a relay twice
nor leaves the journal contradicting the field, and on one HDLC bus a disconnect goes ahead
of the bulk reads without the bus ever carrying two associations."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from headend.localservers import MosquittoServer, free_port
from headend.protocols.modbus_maps import shipped_maps
from simulators.clock import Clock
from simulators.dlms_meter import HdlcBus, SimulatedDlmsMeter
from simulators.modbus_meter import ModbusSimulator, SimulatedMeter
from simulators.mqtt_concentrator import SimulatedConcentrator
from simulators.ptypair import NullModem
from tests.conftest import Spawn
from tests.serving import Served, issue_tokens
from tests.sites import dlms_meter, hdlc_bus_link, tcp_link, write_site

ANY_TIME = 'disconnect_windows = [{ days = "mon-sun", start = "00:00", end = "23:59" }]'


def modbus_meters(count: int, *, protected: Callable[[int], str | None] = lambda _u: None) -> str:
    out = []
    for unit in range(1, count + 1):
        protection = protected(unit)
        extra = f'\nprotected = true\nprotection = "{protection}"' if protection else ""
        out.append(f'[[meters]]\nid = "C{unit:03d}"\nlink = "gw"\naddress = {unit}\nmap = "sim-relay-meter"{extra}\n')
    return "\n".join(out)


class ModbusSite:
    def __init__(self, units: int) -> None:
        meter_map = shipped_maps()["sim-relay-meter"]
        self.sim = ModbusSimulator([SimulatedMeter(u, meter_map, Clock()) for u in range(1, units + 1)])
        self.port = free_port()

    def writes(self, unit: int) -> int:
        return self.sim.meters[unit].relay_writes

    def connected(self, unit: int) -> bool:
        return self.sim.meters[unit].relay_connected


@pytest.fixture
async def modbus_site() -> AsyncIterator[Callable[[int], ModbusSite]]:
    sites: list[ModbusSite] = []

    def make(units: int) -> ModbusSite:
        site = ModbusSite(units)
        sites.append(site)
        return site

    yield make
    for site in sites:
        await site.sim.stop()


async def serve(tmp_path: Path, spawn: Spawn, body: str, switching: str = "", **env: str) -> Served:
    tokens = issue_tokens(tmp_path)
    api_port = free_port()
    write_site(tmp_path, api_port, f"""
[switching]
{ANY_TIME}
confirm_timeout = "3s"
poll_interval = "50ms"
{switching}
{body}""")
    served = Served(tmp_path, f"http://127.0.0.1:{api_port}", tokens, spawn, env=dict(env))
    await served.start()
    return served


async def test_a_payment_one_second_after_a_bulk_of_disconnects_wins(
    tmp_path: Path, spawn: Spawn, modbus_site: Callable[[int], ModbusSite]
) -> None:
    site = modbus_site(30)
    await site.sim.start_tcp("127.0.0.1", site.port)
    served = await serve(tmp_path, spawn, tcp_link("gw", "modbus-tcp", site.port, "2s") + modbus_meters(30),
                         "disconnects_per_link_per_minute = 6")  # fmt: skip
    try:
        bulk = {"commands": [{"meter": f"C{u:03d}", "action": "disconnect", "reason": "arrears run 12/2026"}
                             for u in range(1, 31)]}  # fmt: skip
        r = await served.post("/commands/bulk", "anna", bulk)
        assert [x["status"] for x in r.json()["results"]] == [202] * 30
        await asyncio.sleep(1)  # the customer pays a second later (a real second on the server's side)
        paid = await served.post("/billing/events", "billing", {"type": "payment_received", "meter": "C030",
                                                                "reference": "PAY-30"})  # fmt: skip
        assert paid.status_code == 202 and paid.json()["state"] == "queued"
        cancelled = paid.json()["cancelled"]
        assert len(cancelled) == 1
        reconnect = await served.until(paid.headers["Location"], timeout=2)
        assert reconnect["state"] == "confirmed" and reconnect["evidence"]["operated"] is False
        gone = await served.command(f"/commands/{cancelled[0]}")
        assert gone["state"] == "cancelled" and gone["code"] == "reconnect" and "PAY-30" in gone["reason"]
        first = await served.until(r.json()["results"][0]["href"])
        assert first["state"] == "confirmed" and not site.connected(1)
        assert site.writes(30) == 0 and site.connected(30), "the paid customer's relay was never operated"
    finally:
        await served.stop()


async def test_fifty_concurrent_retries_with_one_key_operate_the_relay_once(
    tmp_path: Path, spawn: Spawn, modbus_site: Callable[[int], ModbusSite]
) -> None:
    site = modbus_site(2)
    await site.sim.start_tcp("127.0.0.1", site.port)
    served = await serve(tmp_path, spawn, tcp_link("gw", "modbus-tcp", site.port, "2s") + modbus_meters(2))
    try:
        body = {"action": "disconnect", "reason": "arrears #4711", "idempotency_key": "req-4711"}
        answers = await asyncio.gather(*(served.post("/meters/C001/commands", "anna", body) for _ in range(50)))
        assert {a.json()["id"] for a in answers} == {answers[0].json()["id"]}
        assert sorted(a.status_code for a in answers) == [200] * 49 + [202]
        done = await served.until(answers[0].headers["Location"])
        assert done["state"] == "confirmed" and done["attempts"] == 1
        assert [e["state"] for e in done["events"]].count("sent") == 1
        assert site.writes(1) == 1
        other = await served.post("/meters/C002/commands", "anna", body)  # the same key for another meter
        assert other.status_code == 202 and other.json()["id"] != done["id"]
        await served.until(other.headers["Location"])
        assert site.writes(2) == 1
    finally:
        await served.stop()


async def test_protected_customers_need_an_explicit_override_and_a_second_person(
    tmp_path: Path, spawn: Spawn, modbus_site: Callable[[int], ModbusSite]
) -> None:
    site = modbus_site(3)
    await site.sim.start_tcp("127.0.0.1", site.port)
    meters = modbus_meters(3, protected=lambda u: "water" if u == 2 else None)
    served = await serve(tmp_path, spawn, tcp_link("gw", "modbus-tcp", site.port, "2s") + meters,
                         "protected_approval = true")  # fmt: skip
    try:
        bulk = {"commands": [{"meter": f"C{u:03d}", "action": "disconnect", "reason": "arrears"} for u in (1, 2, 3)]}
        results = (await served.post("/commands/bulk", "chief", bulk)).json()["results"]
        assert [x["status"] for x in results] == [202, 422, 202]
        assert results[1]["code"] == "protected" and "protected customer (water)" in results[1]["reason"]
        billing = await served.post("/billing/events", "billing", {"type": "disconnect_for_arrears", "meter": "C002",
                                                                   "reference": "INV-2"})  # fmt: skip
        assert billing.status_code == 422 and billing.json()["code"] == "protected"
        asked = await served.post("/meters/C002/commands", "chief", {"action": "disconnect", "reason": "court order",
                                                                     "override": "court order 17/2026"})  # fmt: skip
        assert asked.status_code == 202 and asked.json()["state"] == "awaiting_approval"
        approve = f"/commands/{asked.json()['id']}/approve"
        assert (await served.post(approve, "chief", {})).status_code == 403  # the same person
        assert (await served.post(approve, "anna", {})).status_code == 403  # no override role
        for href in (results[0]["href"], results[2]["href"]):
            await served.until(href)
        assert site.writes(2) == 0 and site.connected(2)
        assert (await served.post(approve, "deputy", {})).status_code == 200
        done = await served.until(asked.headers["Location"])
        assert done["state"] == "confirmed" and done["approved_by"] == "deputy" and not site.connected(2)
        metrics = (await served.client.get("/metrics")).text
        assert 'headend_switching_commands{action="disconnect",state="confirmed"} 3.0' in metrics
        assert "headend_switching_confirmation_seconds_count" in metrics
    finally:
        await served.stop()


async def test_killed_in_the_middle_of_a_bulk_of_100_nothing_is_operated_twice(
    tmp_path: Path, spawn: Spawn, modbus_site: Callable[[int], ModbusSite]
) -> None:
    site = modbus_site(100)
    await site.sim.start_tcp("127.0.0.1", site.port)
    served = await serve(tmp_path, spawn, tcp_link("gw", "modbus-tcp", site.port, "2s") + modbus_meters(100),
                         "disconnects_per_link_per_minute = 600")  # fmt: skip
    try:
        bulk = {"commands": [{"meter": f"C{u:03d}", "action": "disconnect", "reason": "arrears run"}
                             for u in range(1, 101)]}  # fmt: skip
        ids = [x["id"] for x in (await served.post("/commands/bulk", "anna", bulk)).json()["results"]]
        async with asyncio.timeout(60):
            while sum(site.writes(u) for u in range(1, 101)) < 20:  # noqa: ASYNC110 - watching the simulator until a fifth of the relays moved
                await asyncio.sleep(0.01)
        await served.kill()
        before = {u: site.writes(u) for u in range(1, 101)}
        assert 0 < sum(before.values()) < 100, "killed in the middle"
        started = await served.start()
        assert started < 5, f"the API answered {started:.1f} s after the restart"
        final = {}
        for cid in ids:
            final[cid] = (await served.until(f"/commands/{cid}", timeout=60))["state"]
        assert set(final.values()) <= {"confirmed", "failed", "expired", "cancelled"}
        assert all(site.writes(u) <= 1 for u in range(1, 101)), "no relay operated twice"
        for u, cid in enumerate(ids, start=1):  # the journal matches the field
            assert (final[cid] == "confirmed") == (not site.connected(u)), (u, final[cid])
    finally:
        await served.stop()


async def test_killed_with_concentrator_commands_in_sent_the_restart_confirms_from_the_field(
    tmp_path: Path, spawn: Spawn, mosquitto_server: MosquittoServer
) -> None:
    dc_id = f"dc-{uuid.uuid4().hex[:8]}"
    meters = [f"Q{i}" for i in range(6)]
    dc = SimulatedConcentrator(dc_id, "127.0.0.1", mosquitto_server.port, meters, Clock())
    dc.faults.mute_relay_answers = True  # operates the relays, the answers are lost
    await dc.start()
    body = f"""
[[links]]
id = "broker"
kind = "mqtt"
host = "127.0.0.1"
port = {mosquitto_server.port}
timeout = "20s"
[[concentrators]]
id = "{dc_id}"
link = "broker"
max_sessions = 6
""" + "".join(f'[[meters]]\nid = "{m}"\nconcentrator = "{dc_id}"\n' for m in meters)
    served = await serve(tmp_path, spawn, body, "workers = 12")  # six disconnects in flight on one concentrator
    try:
        hrefs = []
        for m in meters:
            r = await served.post(f"/meters/{m}/commands", "anna", {"action": "disconnect", "reason": "arrears"})
            hrefs.append(r.headers["Location"])
        for href in hrefs:
            await served.until(href, {"sent"})
        async with asyncio.timeout(10):
            while any(dc.loads[m].relay_connected for m in meters):  # noqa: ASYNC110 - the concentrator works through the relay commands
                await asyncio.sleep(0.01)
        await served.kill()
        await dc.stop()  # and the concentrator goes away while the head-end is down
        dc.faults.mute_relay_answers = False
        await served.start()
        for href in hrefs:
            assert (await served.command(href))["state"] == "sent", "not failed because the link is not up yet"
        await dc.start()
        for href in hrefs:
            done = await served.until(href, timeout=30)
            assert done["state"] == "confirmed" and done["evidence"]["relay_after"] == "disconnected"
        relay_commands = [c.meter for name, c in dc.commands if name == "relay"]
        assert sorted(relay_commands) == sorted(meters), "each relay operated once, never resent"
    finally:
        await served.stop()
        await dc.stop()


async def test_on_one_hdlc_bus_a_disconnect_goes_ahead_of_bulk_reads_and_never_shares_the_bus(
    tmp_path: Path, spawn: Spawn
) -> None:
    clock = Clock()
    meters = {a: SimulatedDlmsMeter(f"H{a}", clock, seed=a) for a in (16, 17, 18)}
    bus = HdlcBus(meters)
    with NullModem() as modem:
        await bus.start_serial(modem.a)
        for meter in meters.values():
            meter.faults.delay = 0.02  # every frame a little slow: a profile read takes a while
        body = hdlc_bus_link("rs485", modem.b) + "".join(
            dlms_meter(f"H{a}", "rs485", "BUS_PASSWORD", group="bus", physical=a) for a in meters
        ) + """
[[plans]]
id = "profiles"
select = { group = "bus" }
read = ["profile"]
every = "10s"
window = "2s"
history = "1d"
"""
        served = await serve(tmp_path, spawn, body, BUS_PASSWORD="12345678")
        try:
            async with asyncio.timeout(30):
                while not bus.sessions:  # noqa: ASYNC110 - until the plan's first association is on the bus
                    await asyncio.sleep(0.005)
            reading = bus.sessions[0]
            r = await served.post("/meters/H18/commands" if reading != 18 else "/meters/H17/commands", "anna",
                                  {"action": "disconnect", "reason": "arrears"})  # fmt: skip
            target = int(r.json()["meter"][1:])
            done = await served.until(r.headers["Location"], timeout=60)
            assert done["state"] == "confirmed" and meters[target].control_state == 0
            # The disconnect took the bus right after the meter being read, ahead of the bulk reads.
            assert bus.sessions[:2] == [reading, target], bus.sessions
            async with asyncio.timeout(60):
                while len(set(bus.sessions)) < 3 or len(bus.sessions) < 4:  # noqa: ASYNC110 - the plan goes on with the rest
                    await asyncio.sleep(0.01)
            assert bus.most_connected == 1, "the bus carried two associations at once"
        finally:
            await served.stop()
            await bus.stop()
