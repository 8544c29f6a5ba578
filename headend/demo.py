"""`headend demo`: the whole head-end on one machine, nothing to install but the package.

Starts simulated meters of every protocol available here (DLMS over the TCP wrapper, a
Modbus TCP gateway with relay meters, and MQTT concentrators when a `mosquitto` binary is
installed), writes a site config under the demo directory, runs `headend serve` on it with
the embedded SQLite store, shows live progress, and says where to look.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from rich.console import Console
from rich.live import Live
from rich.table import Table

from headend.api.auth import TokenStore
from headend.config import Config, parse_config
from headend.localservers import MosquittoServer, ServerNotAvailable, free_port
from headend.protocols.modbus_maps import shipped_maps
from headend.server import serve
from simulators.clock import Clock
from simulators.dlms_meter import SimulatedDlmsMeter
from simulators.modbus_meter import ModbusSimulator, SimulatedMeter
from simulators.mqtt_concentrator import SimulatedConcentrator


def site_config(workdir: Path, dlms_ports: list[int], modbus_port: int, mqtt_port: int | None,
                api_port: int, concentrators: dict[str, list[str]]) -> Config:  # fmt: skip
    links: list[dict[str, object]] = [
        {"id": f"dlms-{i}", "kind": "tcp", "protocol": "dlms-wrapper", "host": "127.0.0.1", "port": p, "timeout": "3s"}
        for i, p in enumerate(dlms_ports)
    ]
    links.append({"id": "modbus-gw", "kind": "tcp", "protocol": "modbus-tcp", "host": "127.0.0.1",
                  "port": modbus_port, "timeout": "1s"})  # fmt: skip
    meters: list[dict[str, object]] = [
        {"id": f"DLMS-{i + 1:03d}", "link": f"dlms-{i}", "groups": ["dlms"],
         "dlms": {"authentication": "lls", "password_env": "HEADEND_DEMO_DLMS_PASSWORD"}}
        for i in range(len(dlms_ports))
    ]  # fmt: skip
    meters += [{"id": f"MB-{u:03d}", "link": "modbus-gw", "address": u, "map": "sim-relay-meter",
                "groups": ["modbus"]} for u in (1, 2, 3)]  # fmt: skip
    raw: dict[str, object] = {
        "state_dir": str(workdir / "state"),
        "storage": {"backend": "sqlite", "outbox": str(workdir / "outbox.sqlite"),
                    "sqlite": {"path": str(workdir / "readings.sqlite")}},
        "api": {"port": api_port, "tokens_file": str(workdir / "tokens.toml")},
        "switching": {"disconnect_windows": [{"days": "mon-sun", "start": "00:00", "end": "23:59"}]},
        "links": links,
        "meters": meters,
        "plans": [
            {"id": "dlms-load-profile", "select": {"group": "dlms"}, "read": ["clock", "profile"], "every": "5s",
             "history": "1d", "window": "5s"},
            {"id": "modbus-registers", "select": {"group": "modbus"}, "read": ["registers"], "every": "5s",
             "channels": ["1-0:1.8.0.255", "1-0:16.7.0.255", "1-0:32.7.0.255"], "window": "5s"},
        ],
    }  # fmt: skip
    if mqtt_port is not None:
        links.append({"id": "broker", "kind": "mqtt", "host": "127.0.0.1", "port": mqtt_port})
        raw["concentrators"] = [{"id": c, "link": "broker"} for c in concentrators]
        meters += [{"id": m, "concentrator": c, "groups": ["mqtt"]} for c, ms in concentrators.items() for m in ms]
    return parse_config(raw, "<demo site>")


def progress(config: Config, workdir: Path, started: float, until: float) -> Table:
    table = Table(title=f"headend demo - {max(0, until - time.monotonic()):.0f}s left (Ctrl-C stops it)")
    for col in ("meter", "protocol", "readings stored", "newest reading (UTC)"):
        table.add_column(col)
    counts: dict[str, tuple[int, str]] = {}
    with contextlib.suppress(sqlite3.Error):
        db = sqlite3.connect(f"file:{workdir / 'readings.sqlite'}?mode=ro", uri=True)
        rows = db.execute("SELECT meter, count(*), max(ts) FROM readings GROUP BY meter").fetchall()
        db.close()
        counts = {m: (n, time.strftime("%H:%M:%S", time.gmtime(ts / 1e9))) for m, n, ts in rows}
    for meter in config.meters:
        protocol = "mqtt" if meter.concentrator else ("dlms" if meter.dlms or meter.id.startswith("DLMS") else "modbus")
        n, newest = counts.get(meter.id, (0, "-"))
        table.add_row(meter.id, protocol, str(n), newest)
    return table


async def billing_view(api_port: int, token: str, meter: str) -> str:
    """What the billing API says of one meter's last six hours (validated, estimated, complete)."""
    now = datetime.now(UTC)
    end = now.replace(minute=now.minute // 15 * 15, second=0, microsecond=0)
    params = {"start": (end - timedelta(hours=6)).isoformat(), "end": end.isoformat()}
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=30) as client:
            r = await client.get(f"/billing/meters/{meter}/determinants", params=params,
                                 headers={"Authorization": f"Bearer {token}"})  # fmt: skip
    except httpx.HTTPError as exc:
        return f"[yellow]billing view unavailable: {exc}[/]"
    if r.status_code != 200:
        return f"[yellow]billing view: HTTP {r.status_code} {r.text[:200]}[/]"
    d = r.json()
    return (f"Billing view of {meter}, last 6 h (GET /billing/meters/{meter}/determinants): "
            f"{d['consumption_kwh']:.3f} kWh, max demand {d['max_demand_kw'] or 0:.2f} kW, "
            f"{d['completeness_pct']:.1f} % actual, intervals by status {d['by_status']}.")


async def run_demo(workdir: Path, duration: float, console: Console) -> int:
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    clock = Clock()
    dlms = [SimulatedDlmsMeter(f"{i}", clock, seed=i + 1) for i in range(3)]
    dlms_ports = [await m.start() for m in dlms]
    modbus = ModbusSimulator([SimulatedMeter(u, shipped_maps()["sim-relay-meter"], clock) for u in (1, 2, 3)])
    modbus_port = free_port()
    await modbus.start_tcp("127.0.0.1", modbus_port)
    broker: MosquittoServer | None = None
    fleet: list[SimulatedConcentrator] = []
    concentrators = {f"DC-{k}": [f"DC-{k}-M{n}" for n in range(1, 4)] for k in (1, 2)}
    try:
        broker = MosquittoServer(workdir / "mosquitto")
        await asyncio.to_thread(broker.start)
    except ServerNotAvailable as exc:
        console.print(f"[yellow]no MQTT concentrators in this demo: {exc}[/]")
        broker = None
    api_port = free_port()
    cfg = site_config(workdir, dlms_ports, modbus_port, broker.port if broker else None, api_port, concentrators)
    token = TokenStore.issue(workdir / "tokens.toml", "demo", frozenset({"operator", "engineer"}))
    os.environ["HEADEND_DEMO_DLMS_PASSWORD"] = dlms[0].password.decode()
    stop = asyncio.Event()
    ready = asyncio.Event()
    server = asyncio.create_task(serve(cfg, stop=stop, ready=ready))
    # The concentrators publish their backlog once the head-end is subscribed to them.
    waiting = asyncio.ensure_future(ready.wait())
    await asyncio.wait([server, waiting], return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if broker is not None:
        for cid, meters in concentrators.items():
            dc = SimulatedConcentrator(cid, "127.0.0.1", broker.port, meters, clock, backlog=timedelta(hours=6))
            fleet.append(dc)
            await dc.start()
    started = time.monotonic()
    until = started + duration
    try:
        with Live(
            progress(cfg, workdir, started, until), console=console, refresh_per_second=2, transient=True
        ) as live:
            while time.monotonic() < until and not server.done():
                for dc in fleet:
                    await dc.publish_until(clock.datetime())
                await asyncio.sleep(1)  # the demo's screen refresh tick
                live.update(progress(cfg, workdir, started, until))
        billing = await billing_view(api_port, token, "DLMS-001")
    finally:
        stop.set()
        code = await server
        for dc in fleet:
            await dc.stop()
        await modbus.stop()
        for m in dlms:
            await m.stop()
        if broker is not None:
            await asyncio.to_thread(broker.stop)
    console.print(progress(cfg, workdir, started, started))
    console.print(f"Readings are in [bold]{workdir / 'readings.sqlite'}[/] (SQLite, table `readings`).")
    if billing:
        console.print(billing)
    console.print(f"The API ran on http://127.0.0.1:{api_port} with token [bold]{token}[/] (operator, engineer);")
    console.print("run `headend serve --config FILE` with your own site config to keep it running.")
    return code
