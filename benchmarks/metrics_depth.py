"""How fast `headend serve` answers /metrics and /health with millions of readings waiting in
its outbox (InfluxDB down for hours at a large site): the first wave counted the outbox's rows
on the event loop at every scrape (81 ms at 2 M rows).

Fills an outbox with `--readings` readings as the first wave kept them (one row each: the
worst case a head-end upgraded during an outage starts with) plus as many again in series rows,
starts `headend serve` on it with InfluxDB pointing at a closed port (nothing drains), then
times /metrics and /health. The limit it is compared with, measured in the same run: /health,
which touches no database.

    python benchmarks/metrics_depth.py [--readings 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sqlite3
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from serving import start_serve, until_healthy

from headend.localservers import free_port
from headend.model import IMPORT_INTERVAL, Reading
from headend.storage import codec
from headend.storage.outbox import Outbox
from headend.storage.series import of_readings


def fill(path: Path, readings: int) -> None:
    """`readings` one-reading rows (the first wave's format) and `readings` more in series."""
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL, "
               "accepted_ns INTEGER NOT NULL)")  # fmt: skip
    t0 = datetime(2026, 3, 9, tzinfo=UTC)
    one = Reading("M00001", IMPORT_INTERVAL, t0, 0.25, unit="kWh", source="mqtt/dc-000")
    body = codec.encode(one)
    db.executemany("INSERT INTO outbox (body, accepted_ns) VALUES (?, 0)", ((body,) for _ in range(readings)))
    db.commit()
    db.close()
    outbox = Outbox(path)  # upgrades the table, counts it once
    day = [Reading(f"M{m:05d}", IMPORT_INTERVAL, t0 + timedelta(minutes=15 * (i + 1)), 0.25, unit="kWh",
                   source="mqtt/dc-000") for m in range(1000) for i in range(96)]  # fmt: skip
    for _ in range(readings // len(day)):
        outbox.accept_series_sync(of_readings(day))
    outbox.close()


async def timed(client: httpx.AsyncClient, path: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        began = time.perf_counter()
        r = await client.get(path)
        out.append(time.perf_counter() - began)
        assert r.status_code == 200, r.text
    return out


async def run(work: Path, readings: int) -> None:
    outbox = work / "outbox.sqlite"
    began = time.perf_counter()
    await asyncio.to_thread(fill, outbox, readings)
    print(f"outbox filled in {time.perf_counter() - began:.0f} s")
    api = free_port()
    (work / "site.toml").write_text(
        f'state_dir = "{work / "state"}"\n[storage]\nbackend = "influx"\noutbox = "{outbox}"\n'
        f'[storage.influx]\nurl = "http://127.0.0.1:{free_port()}"\n[api]\nport = {api}\n'
    )
    serve = await start_serve(work / "site.toml", log=work / "serve.log")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api}", timeout=30) as client:
            await until_healthy(client, serve, work / "serve.log")
            metrics = await timed(client, "/metrics", 50)
            health = await timed(client, "/health", 50)
            depth = next(line for line in (await client.get("/metrics")).text.splitlines()
                         if line.startswith("headend_outbox_depth "))  # fmt: skip
    finally:
        serve.terminate()
        await serve.wait()
    ms = 1000
    waiting = int(float(depth.split()[-1]))
    print(f"{waiting:,} readings waiting ({readings:,} one per row as the first wave kept them, the rest in series "
          "rows)")  # fmt: skip
    print(f"/metrics: p50 {statistics.median(metrics) * ms:.1f} ms, max {max(metrics) * ms:.1f} ms (50 requests)")
    print(f"limit (same run): /health p50 {statistics.median(health) * ms:.1f} ms, max {max(health) * ms:.1f} ms; "
          f"ratio of p50s {statistics.median(metrics) / statistics.median(health):.1f}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readings", type=int, default=1_000_000)
    args = p.parse_args()
    print(f"{platform.python_implementation()} {platform.python_version()}; {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(Path(tmp), args.readings))


if __name__ == "__main__":
    main()
