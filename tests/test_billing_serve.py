"""Billing-grade data from `headend serve` as deployed (issue #15)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from simulators.clock import Clock
from simulators.dlms_meter import A_PLUS, HdlcBus, SimulatedDlmsMeter
from simulators.ptypair import NullModem
from tests.conftest import Spawn
from tests.test_switching_serve import serve

STEP = timedelta(minutes=15)


def floor_quarter(t: datetime) -> datetime:
    return t - (t - datetime(1970, 1, 1, tzinfo=UTC)) % STEP


async def test_a_real_outage_costs_a_bounded_number_of_re_reads_and_its_neighbour_is_read_every_run(
    tmp_path: Path, spawn: Spawn
) -> None:
    """With validation on arrival (the default), an outage the meter really had is asked
    again `reread_attempts` times at most, not once per validation; the healthy meter on
    the same bus is read every run."""
    clock = Clock()
    outage, healthy = SimulatedDlmsMeter("G16", clock, seed=16), SimulatedDlmsMeter("H17", clock, seed=17)
    last = floor_quarter(clock.datetime()) - STEP
    outage.power_outage(last - 3 * STEP, last)  # a permanent hour of nothing
    bus = HdlcBus({16: outage, 17: healthy})
    with NullModem() as modem:
        await bus.start_serial(modem.a)
        body = f"""
[vee]
reread_attempts = 3
reread_spacing = "1s"
[[links]]
id = "rs485"
kind = "serial"
protocol = "dlms-hdlc"
device = "{modem.b}"
timeout = "5s"
""" + "".join(f"""[[meters]]
id = "{name}"
link = "rs485"
groups = ["bus"]
dlms = {{ authentication = "lls", password_env = "BUS_PASSWORD", physical = {a} }}
""" for a, name in ((16, "G16"), (17, "H17"))) + """
[[plans]]
id = "profiles"
select = { group = "bus" }
read = ["profile"]
every = "1s"
window = "1s"
history = "3h"
"""
        served = await serve(tmp_path, spawn, body, BUS_PASSWORD="12345678")
        try:
            async with asyncio.timeout(90):
                while healthy.associations < 12:  # noqa: ASYNC110 - another process reads the meters
                    await asyncio.sleep(0.1)
        finally:
            await served.stop()
            await bus.stop()
    with contextlib.closing(sqlite3.connect(tmp_path / "state" / "vee.sqlite")) as db:
        asked = dict(db.execute("SELECT meter, max(attempts) FROM rereads GROUP BY meter"))
    assert asked.get("G16") == 3, "the outage was asked again exactly reread_attempts times"
    extra = outage.associations - healthy.associations
    assert extra <= 3, f"{outage.associations} associations on the outage meter, {healthy.associations} beside it"


def stored_profile(path: Path, meter: str) -> list[tuple[int, float, str]]:
    """(ts in s, value, qualities) of the A+ register at each interval end, as stored."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return [(ts // 10**9, value, quality) for ts, value, quality in db.execute(
            "SELECT ts, value, quality FROM readings WHERE kind = 'interval' AND meter = ? AND channel = ? "
            "ORDER BY ts", (meter, "1-0:1.8.0.255"))]  # fmt: skip


async def test_meters_with_wrong_clocks_get_every_interval_at_its_true_time_with_its_own_value(
    tmp_path: Path, spawn: Spawn
) -> None:
    """Through serve: a meter two hours fast (clock sync on, and off), one whose clock jumped
    two hours ahead three hours ago, and a good one. Every stored interval is on the grid, at
    its true time, with the value the meter had then (the simulator's truth); the moved ones
    are flagged time-adjusted (2.4.128)."""
    clock = Clock()
    now = clock.datetime()
    meters = {name: SimulatedDlmsMeter(name, clock, seed=i + 1) for i, name in enumerate(("F1", "F2", "J1", "N1"))}
    meters["F1"].faults.clock_offset_s = 7200.0
    meters["F2"].faults.clock_offset_s = 7200.0
    jumped = floor_quarter(now) - timedelta(hours=3) + timedelta(minutes=7)
    meters["J1"].change_clock(7200.0, at=jumped)
    ports = {name: await m.start() for name, m in meters.items()}
    body = "".join(f"""
[[links]]
id = "l-{name}"
kind = "tcp"
protocol = "dlms-wrapper"
host = "127.0.0.1"
port = {port}
timeout = "3s"
[[meters]]
id = "{name}"
link = "l-{name}"
groups = ["{'unsynced' if name == 'F2' else 'synced'}"]
dlms = {{ authentication = "lls", password_env = "METER_PASSWORD" }}
""" for name, port in ports.items()) + "".join(f"""
[[plans]]
id = "{group}"
select = {{ group = "{group}" }}
read = ["clock", "profile"]
every = "2s"
window = "1s"
history = "6h"
sync_clock = {str(group == "synced").lower()}
""" for group in ("synced", "unsynced"))
    served = await serve(tmp_path, spawn, body, METER_PASSWORD="12345678")
    readings = tmp_path / "readings.sqlite"
    try:
        async with asyncio.timeout(60):
            # Six hours of quarter hours for each meter; the jumped one needs a second run.
            while not readings.exists() or any(len(stored_profile(readings, m)) < 24 for m in meters):  # noqa: ASYNC110
                await asyncio.sleep(0.2)  # another process reads the meters
    finally:
        await served.stop()
        for m in meters.values():
            await m.stop()
    for name, meter in meters.items():
        rows = stored_profile(readings, name)
        assert all(ts % 900 == 0 for ts, _v, _q in rows), f"{name}: an interval off the grid"
        for ts, value, _q in rows:
            assert value == meter.register_value(A_PLUS, ts) / 1000, f"{name} at {ts}: not the meter's value then"
        adjusted = {ts for ts, _v, q in rows if "2.4.128" in q}
        if name in ("F1", "F2"):
            assert adjusted == {ts for ts, _v, _q in rows if ts <= now.timestamp()}, name
        elif name == "J1":
            assert adjusted == {ts for ts, _v, _q in rows if jumped.timestamp() < ts <= now.timestamp()}
        else:
            assert not adjusted
    assert meters["F1"].faults.clock_offset_s != 7200.0 and meters["F2"].faults.clock_offset_s == 7200.0


async def test_frozen_billing_registers_and_the_meters_own_maximum_demand_reach_the_bill(
    tmp_path: Path, spawn: Spawn
) -> None:
    """A day's determinants start and end on the registers the meter froze at midnight (its
    daily billing profile, named as the source) and carry the meter's own maximum demand
    with its time, each equal to the simulator's to the Wh and W, compared as text."""
    clock = Clock()
    meter = SimulatedDlmsMeter("B1", clock, seed=5)
    port = await meter.start()
    body = f"""
[[links]]
id = "l-B1"
kind = "tcp"
protocol = "dlms-wrapper"
host = "127.0.0.1"
port = {port}
timeout = "3s"
[[meters]]
id = "B1"
link = "l-B1"
dlms = {{ authentication = "lls", password_env = "METER_PASSWORD" }}
[[plans]]
id = "daily"
select = {{ meters = ["B1"] }}
read = ["clock", "profile", "billing", "registers"]
channels = ["1-0:1.6.0.255"]
every = "1h"
window = "1m"
history = "2d"
"""
    served = await serve(tmp_path, spawn, body, METER_PASSWORD="12345678")
    midnight = clock.datetime().replace(hour=0, minute=0, second=0, microsecond=0)
    try:
        r = await served.post("/meters/B1/read", "anna", {"read": ["clock", "profile", "billing", "registers"],
                                                            "channels": ["1-0:1.6.0.255"], "hours": 48})  # fmt: skip
        assert r.status_code == 200, r.text
        period = {"start": (midnight - timedelta(days=1)).isoformat(), "end": midnight.isoformat()}
        async with asyncio.timeout(30):
            while True:
                d = await served.client.get("/billing/meters/B1/determinants", params=period,
                                            headers=served.auth("billing"))  # fmt: skip
                raw = json.loads(d.text, parse_float=str)
                if raw["start_register_source"]:
                    break
                await asyncio.sleep(0.1)  # the writer stores what the read brought
        month = midnight.replace(day=1) - timedelta(days=1)  # the month so far, whatever today is
        this_month = {"start": month.isoformat(), "end": (midnight + timedelta(days=1)).isoformat()}
        whole = await served.client.get("/billing/meters/B1/determinants", headers=served.auth("billing"),
                                        params=this_month)  # fmt: skip
        demand = json.loads(whole.text, parse_float=str)
    finally:
        await served.stop()
        await meter.stop()
    frozen = {t: meter.register_value(A_PLUS, t.timestamp()) for t in (midnight - timedelta(days=1), midnight)}
    daily, monthly = "billing profile daily 0-0:98.1.0.255", "billing profile monthly 0-0:98.2.0.255"
    assert raw["start_register_source"] == (monthly if (midnight - timedelta(days=1)).day == 1 else daily)
    assert raw["end_register_source"] == (monthly if midnight.day == 1 else daily)  # the same value, both froze it
    assert Decimal(raw["start_register_kwh"]) == Decimal(frozen[midnight - timedelta(days=1)]).scaleb(-3)
    assert Decimal(raw["end_register_kwh"]) == Decimal(frozen[midnight]).scaleb(-3)
    watts, reached = meter.max_demand()
    assert Decimal(demand["meter_max_demand_kw"]) == Decimal(watts).scaleb(-3)
    assert demand["meter_max_demand_at"] == reached.isoformat()
