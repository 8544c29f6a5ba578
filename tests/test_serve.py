"""`headend serve` as a real process: plans read simulated DLMS and Modbus meters into the
store, /health /metrics /status answer, switching works over the API, SIGTERM exits cleanly
and a restart goes on."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sqlite3
import ssl
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from headend.api.auth import TokenStore
from headend.cli import main
from headend.localservers import free_port
from headend.protocols.modbus_maps import shipped_maps
from simulators.clock import Clock
from simulators.dlms_meter import HdlcBus, SimulatedDlmsMeter
from simulators.modbus_meter import ModbusSimulator, SimulatedMeter
from tests.certs import self_signed
from tests.conftest import Spawn
from tests.sites import SWITCH_ANY_TIME, tcp_link, write_site

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[tuple[Path, str, int]]:
    clock = Clock()  # the server runs on the wall clock
    dlms = SimulatedDlmsMeter("D1", clock)
    dlms_port = await dlms.start()
    modbus = ModbusSimulator([SimulatedMeter(1, shipped_maps()["sim-relay-meter"], clock)])
    modbus_port = free_port()
    await modbus.start_tcp("127.0.0.1", modbus_port)
    api_port = free_port()
    token = TokenStore.issue(tmp_path / "tokens.toml", "anna", frozenset({"operator", "billing"}))
    write_site(tmp_path, api_port, SWITCH_ANY_TIME + f"""
{tcp_link("dlms-tcp", "dlms-wrapper", dlms_port, "2s")}
{tcp_link("modbus-gw", "modbus-tcp", modbus_port, "1s")}
[[meters]]
id = "D1"
link = "dlms-tcp"
groups = ["dlms"]
dlms = {{ authentication = "lls", password_env = "D1_PASSWORD" }}
[[meters]]
id = "R1"
link = "modbus-gw"
address = 1
map = "sim-relay-meter"
groups = ["modbus"]
[[plans]]
id = "dlms-profile"
select = {{ group = "dlms" }}
read = ["clock", "profile"]
every = "1s"
history = "2h"
window = "1s"
[[plans]]
id = "modbus-registers"
select = {{ group = "modbus" }}
read = ["registers"]
channels = ["1-0:1.8.0.255", "1-0:16.7.0.255"]
every = "1s"
window = "1s"
""")
    yield tmp_path, token, api_port
    await modbus.stop()
    await dlms.stop()


Starter = Callable[[Path], Awaitable[asyncio.subprocess.Process]]


@pytest.fixture
def start(spawn: Spawn) -> Starter:
    """Starts `headend serve` on a site directory (killed at the end if the test failed)."""

    async def starter(path: Path) -> asyncio.subprocess.Process:
        return await spawn(
            sys.executable, "-m", "headend.cli", "serve", "--config", str(path / "site.toml"), cwd=ROOT,
            env={**os.environ, "D1_PASSWORD": "12345678", "PYTHONPATH": str(ROOT)}, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip

    return starter


async def wait_for_metric(client: httpx.AsyncClient, text: str) -> str:
    async with asyncio.timeout(30):
        while True:
            try:
                body = (await client.get("/metrics")).text
                if text in body:
                    return body
            except httpx.TransportError:
                pass  # the server is still starting
            await asyncio.sleep(0.2)  # polling another process's HTTP endpoint


async def wait_for_count(client: httpx.AsyncClient, sample: str, at_least: float) -> float:
    async with asyncio.timeout(60):
        while True:
            try:
                for line in (await client.get("/metrics")).text.splitlines():
                    if line.startswith(sample + " ") and float(line.split()[-1]) >= at_least:
                        return float(line.split()[-1])
            except httpx.TransportError:
                pass  # the server is still starting
            await asyncio.sleep(0.1)  # polling another process's HTTP endpoint


async def test_serve_reads_switches_and_stops_cleanly(
    site: tuple[Path, str, int], start: Starter, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, token, port = site
    proc = await start(path)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        body = await wait_for_metric(client, 'headend_meter_reads_total{plan="modbus-registers",result="ok"}')
        await wait_for_metric(client, 'headend_meter_reads_total{plan="dlms-profile",result="ok"}')
        assert "headend_outbox_depth" in body and "headend_meter_read_seconds_bucket" in body
        # How late the loop runs what is due, for an operator to see a server doing too much at once.
        assert await wait_for_count(client, "headend_event_loop_lag_seconds_count", 2) >= 2
        assert "headend_event_loop_lag_max_seconds" in body
        assert (await client.get("/health")).json() == {"status": "ok"}
        assert (await client.get("/status")).status_code == 401  # the site's state is not for everyone
        status = (await client.get("/status", headers={"Authorization": f"Bearer {token}"})).json()
        assert status["writer"]["healthy"] and status["links"]["modbus-gw"] == "up"
        assert set(status["vee"]) == {"validated_on_arrival", "conflicting_values", "failing_intervals"}
        r = await client.post("/meters/R1/commands", json={"action": "disconnect", "reason": "arrears"},
                              headers={"Authorization": f"Bearer {token}"})  # fmt: skip
        assert r.status_code == 202
        auth = {"Authorization": f"Bearer {token}"}
        for _ in range(300):  # polling the API for the outcome, 30 s at most
            final = (await client.get(r.headers["Location"], headers=auth)).json()
            if final["state"] in ("confirmed", "failed"):
                break
            await asyncio.sleep(0.1)
        assert final["state"] == "confirmed"
        on_demand = await client.post("/meters/D1/read", json={"read": ["clock", "profile"], "hours": 1},
                                      headers=auth)  # fmt: skip
        assert on_demand.status_code == 200 and on_demand.json()["expected_intervals"] == 4
        assert (await client.post("/meters/NOPE/read", json={"read": ["clock"]}, headers=auth)).status_code == 404
        assert (await client.post("/meters/D1/read", json={"read": ["clock"]})).status_code == 401
        # The same through the command line, as an operator or a billing clerk would.
        monkeypatch.setenv("HEADEND_TOKEN", token)
        api = ["--api", f"http://127.0.0.1:{port}"]
        assert await asyncio.to_thread(main, ["read", "D1", "--read", "clock,profile", "--hours", "1", *api]) == 0
        now = datetime.now(UTC).replace(second=0, microsecond=0)
        csv_file = path / "export.csv"
        period = ["--start", (now - timedelta(hours=1)).isoformat(), "--end", now.isoformat()]
        code = await asyncio.to_thread(main, ["export", "--meter", "D1", *period, "--out", str(csv_file), *api])
        assert code == 0
        rows = csv_file.read_text().splitlines()
        assert rows[0].startswith("meter,channel,timestamp,value")
        channels = Counter(row.split(",")[1] for row in rows[1:])  # the meter's profile has all four energies
        assert channels == {"1-0:1.29.0.255": 4, "1-0:2.29.0.255": 4, "1-0:3.29.0.255": 4, "1-0:4.29.0.255": 4}
        assert await asyncio.to_thread(main, ["read", "NOPE", *api]) == 1
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    db = sqlite3.connect(path / "readings.sqlite")
    rows = dict(db.execute("SELECT meter, count(*) FROM readings GROUP BY meter").fetchall())
    db.close()
    assert rows.get("D1", 0) >= 8 * 4  # two hours of 15-minute profile, four channels
    assert rows.get("R1", 0) >= 2  # energy and power registers

    # A restart goes on from where it stopped: the profile watermark survived in the outbox.
    proc = await start(path)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        await wait_for_metric(client, 'headend_meter_reads_total{plan="dlms-profile",result="ok"}')
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 30) == 0


async def test_sigterm_mid_run_then_restart_loses_no_read(tmp_path: Path, start: Starter) -> None:
    """Ten meters on one HDLC bus are read one after the other; SIGTERM lands after the first
    is stored. The read in progress commits, the queued ones are left for the next start,
    which reads them all: every meter ends with every interval, none lost, none twice."""
    clock = Clock()
    meters = {n: SimulatedDlmsMeter(f"H{n}", clock, seed=n) for n in range(16, 26)}
    for sim in meters.values():
        sim.faults.delay = 0.04  # a slow line: the run takes seconds, one meter at a time
    bus = HdlcBus(meters)
    bus_port = await bus.start_tcp()
    api_port = free_port()
    meter_entries = "".join(f"""
[[meters]]
id = "H{n}"
link = "bus"
dlms = {{ authentication = "lls", password_env = "D1_PASSWORD", physical = {n} }}
""" for n in meters)  # fmt: skip
    write_site(tmp_path, api_port, tokens=False, body=f"""
{tcp_link("bus", "dlms-hdlc", bus_port, "5s")}
{meter_entries}
[[plans]]
id = "lp"
read = ["profile"]
every = "1s"
deadline = "120s"
window = "1s"
history = "2h"
""")

    def stored() -> dict[str, set[int]]:
        db = sqlite3.connect(tmp_path / "readings.sqlite")
        rows = db.execute("SELECT meter, ts FROM readings WHERE channel = '1-0:1.8.0.255'").fetchall()
        db.close()
        out: dict[str, set[int]] = {}
        for meter, ts in rows:
            out.setdefault(meter, set()).add(ts)
        return out

    proc = await start(tmp_path)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}") as client:
        await wait_for_count(client, 'headend_meter_reads_total{plan="lp",result="ok"}', 1)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    first = stored()
    assert 1 <= len(first) < len(meters)  # stopped mid-run: some meters read, others not yet

    proc = await start(tmp_path)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}") as client:
        await wait_for_count(client, 'headend_meter_reads_total{plan="lp",result="ok"}', len(meters))
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    await bus.stop()
    final = stored()
    assert sorted(final) == sorted(f"H{n}" for n in meters)
    for meter, stamps in first.items():
        assert stamps <= final[meter]  # what the first run stored is all still there
    newest = max(max(s) for s in final.values())
    for meter, stamps in final.items():
        assert len(stamps) >= 8 and max(stamps) == newest, meter  # two hours of intervals, up to date
        ordered = sorted(stamps)
        steps = {b - a for a, b in itertools.pairwise(ordered)}
        assert steps == {15 * 60 * 10**9}, f"{meter} has a gap"


async def test_billing_asks_the_meter_again_for_what_the_store_lacks(tmp_path: Path, start: Starter) -> None:
    """No plan has read the meter yet: the billing request finds the period empty, `serve`
    re-reads it from the DLMS meter (backfill lane), lets the writer store it, and answers
    with actual reads instead of estimates."""
    clock = Clock()
    dlms = SimulatedDlmsMeter("D1", clock)
    dlms_port = await dlms.start()
    api_port = free_port()
    token = TokenStore.issue(tmp_path / "tokens.toml", "bill", frozenset({"billing"}))
    write_site(tmp_path, api_port, f"""
{tcp_link("dlms-tcp", "dlms-wrapper", dlms_port, "2s")}
[[meters]]
id = "D1"
link = "dlms-tcp"
dlms = {{ authentication = "lls", password_env = "D1_PASSWORD" }}
""")
    proc = await start(tmp_path)
    now = datetime.now(UTC)
    end = datetime(now.year, now.month, now.day, now.hour, tzinfo=UTC)  # a boundary the meter has passed
    period = {"start": (end - timedelta(hours=2)).isoformat(), "end": end.isoformat()}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=30) as client:
        await wait_for_metric(client, "headend_outbox_depth")
        r = await client.get("/billing/meters/D1/intervals", params=period,
                             headers={"Authorization": f"Bearer {token}"})  # fmt: skip
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 30) == 0
    await dlms.stop()
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["total"] == 8 and body["counts"] == {"actual": 8}
    assert all("2.0.1" in i["qualities"] and i["version"] == 0 for i in body["intervals"])


async def test_the_api_speaks_https_when_given_a_certificate(tmp_path: Path, start: Starter) -> None:
    cert, key = self_signed(tmp_path)
    api_port = free_port()
    write_site(tmp_path, api_port, tokens=False, body="", api=f'tls_cert = "{cert}"\ntls_key = "{key}"')
    proc = await start(tmp_path)
    trust = ssl.create_default_context(cafile=str(cert))
    async with httpx.AsyncClient(base_url=f"https://127.0.0.1:{api_port}", verify=trust) as client:
        async with asyncio.timeout(30):
            while True:
                try:
                    r = await client.get("/health")
                    break
                except httpx.ConnectError:
                    await asyncio.sleep(0.2)  # the server is still starting
        assert r.status_code == 200 and r.json() == {"status": "ok"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}") as plain:
        with pytest.raises(httpx.HTTPError):
            await plain.get("/health")  # plain HTTP is not spoken on a TLS port
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 30) == 0
