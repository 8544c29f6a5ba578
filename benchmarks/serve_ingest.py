"""Interval values per second from concentrators over MQTT into InfluxDB through `headend
serve` as deployed: its default config (VEE on arrival on), a process of its own.

Starts mosquitto and influxd on free loopback ports, `headend serve` on a site with K
concentrators of N meters, then the concentrator simulator in its own process
(`--backlog-days D`: D days of 15-minute intervals published at once). Reports values/s
from the simulator's start until InfluxDB holds every value of the backlog (VEE's re-reads
of the day before the backlog may add a few more, which the meters do have).

The limit it is compared with, measured in the same run: the head-end's InfluxStore writing
the same number of readings with the same schema straight to influxd (two writers), no
MQTT, no outbox, no VEE.

    python benchmarks/serve_ingest.py [--concentrators 10] [--meters 100] [--days 1] [--profile FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

from headend.localservers import InfluxServer, MosquittoServer, free_port
from headend.model import IMPORT_INTERVAL, Reading
from headend.storage.influx import InfluxStore

ROOT = Path(__file__).resolve().parent.parent


def site(work: Path, broker: int, influx_url: str, api: int, concentrators: int, meters: int) -> str:
    dcs = [f"dc-{k:03d}" for k in range(concentrators)]
    body = "".join(f'[[concentrators]]\nid = "{dc}"\nlink = "broker"\n' for dc in dcs)
    body += "".join(f'[[meters]]\nid = "{dc}-m{n:04d}"\nconcentrator = "{dc}"\n' for dc in dcs for n in range(meters))
    return f"""state_dir = "{work / "state"}"
[storage]
backend = "influx"
outbox = "{work / "outbox.sqlite"}"
[storage.influx]
url = "{influx_url}"
database = "serve"
[api]
port = {api}
[[links]]
id = "broker"
kind = "mqtt"
host = "127.0.0.1"
port = {broker}
{body}"""


async def limit(influx_url: str, total: int) -> float:
    """Values/s the store takes the same readings at, straight from this process."""
    store = InfluxStore(influx_url, "limit")
    await store.open()
    t0 = datetime(2026, 3, 9, tzinfo=UTC)
    per_meter = 96
    readings = [Reading(f"m{i // per_meter:05d}", IMPORT_INTERVAL, t0 + timedelta(minutes=15 * (i % per_meter + 1)),
                        0.25, unit="kWh", source="mqtt/dc") for i in range(total)]  # fmt: skip
    began = time.perf_counter()
    batches = [readings[i : i + 5000] for i in range(0, total, 5000)]

    async def writer(part: list[list[Reading]]) -> None:
        for batch in part:
            await store.write(batch)

    await asyncio.gather(writer(batches[0::2]), writer(batches[1::2]))
    seconds = time.perf_counter() - began
    await store.close()
    return total / seconds


async def run(args: argparse.Namespace, work: Path, broker: MosquittoServer, influx: InfluxServer) -> None:
    total = args.concentrators * args.meters * int(args.days * 96)
    api = free_port()
    (work / "site.toml").write_text(site(work, broker.port, influx.url, api, args.concentrators, args.meters))
    profile = ["-m", "cProfile", "-o", args.profile] if args.profile else []
    serve = await asyncio.create_subprocess_exec(
        sys.executable, *profile, "-m", "headend.cli", "serve", "--config", str(work / "site.toml"), cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    store = InfluxStore(influx.url, "serve")
    await store.open()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api}", timeout=30) as client:
            while True:
                try:
                    if (await client.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)  # the server is starting
        began = time.perf_counter()
        sim = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "simulators.mqtt_concentrator", "--broker", f"127.0.0.1:{broker.port}",
            "--concentrators", str(args.concentrators), "--meters", str(args.meters),
            "--backlog-days", str(args.days), "--start-delay", "0.5",
            cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        published = publishing = 0.0

        async def producer() -> None:
            nonlocal published, publishing
            assert sim.stdout is not None
            async for line in sim.stdout:
                if b"publishing" in line:
                    publishing = time.perf_counter()
                if b"published" in line:
                    published = time.perf_counter() - publishing

        watching = asyncio.create_task(producer())
        try:
            stored = 0
            async with asyncio.timeout(1800), httpx.AsyncClient(base_url=f"http://127.0.0.1:{api}") as client:
                while (stored := await store.count()) < total:
                    if args.timeline:
                        depth = next((line.split()[-1] for line in (await client.get("/metrics")).text.splitlines()
                                      if line.startswith("headend_outbox_depth")), "?")  # fmt: skip
                        print(f"  {time.perf_counter() - began:6.2f} s: {stored:,} stored, outbox {depth}")
                    await asyncio.sleep(0.5)
            done = time.perf_counter()
            seconds = done - began
        finally:
            sim.terminate()
            await sim.wait()
            watching.cancel()
    finally:
        serve.terminate()
        await serve.wait()
    assert stored >= total, f"{stored} of {total} values in InfluxDB"
    store_limit = await limit(influx.url, total)
    rate = total / (done - publishing)
    print(f"{args.concentrators} concentrators x {args.meters} meters x {args.days:g} day(s) = {total:,} values "
          f"through headend serve (VEE on arrival on): {rate:,.0f} values/s in InfluxDB, from the first "
          f"message published to the last value stored ({done - publishing:.1f} s)")  # fmt: skip
    print(f"  the simulator published them all in {published:.1f} s (its backlog made beforehand); "
          f"{seconds:.1f} s from its start, its own start-up and making included")  # fmt: skip
    print(f"  limit (same run): InfluxStore straight to influxd, same schema, 2 writers: {store_limit:,.0f} values/s; "
          f"ratio {rate / store_limit:.2f}")  # fmt: skip
    await store.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concentrators", type=int, default=10)
    p.add_argument("--meters", type=int, default=100)
    p.add_argument("--days", type=float, default=1)
    p.add_argument("--profile", help="run serve under cProfile and write its stats here")
    p.add_argument("--timeline", action="store_true", help="print values stored and the outbox's depth as it goes")
    args = p.parse_args()
    if args.profile:
        args.profile = str(Path(args.profile).resolve())  # serve runs in another directory
    print(f"{platform.python_implementation()} {platform.python_version()}; {os.cpu_count()} cores; simulator, "
          "mosquitto and influxd on the same machine")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with MosquittoServer(work / "mosquitto") as broker, InfluxServer(work / "influxd") as influx:
            asyncio.run(run(args, work, broker, influx))


if __name__ == "__main__":
    main()
