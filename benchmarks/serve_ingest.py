"""Interval values per second from concentrators over MQTT into InfluxDB through `headend
serve` as deployed: its default config (VEE on arrival on), a process of its own.

Starts mosquitto and influxd on free loopback ports, `headend serve` on a site with K
concentrators of N meters, then the concentrator simulator in its own process
(`--backlog-days D`: D days of 15-minute intervals published at once). Reports values/s
from the simulator's start until InfluxDB holds every value of the backlog (VEE's re-reads
of the day before the backlog may add a few more, which the meters do have).

The limit it is compared with, measured in the same run: influxd itself taking the same
number of points in the head-end's schema (line protocol made beforehand, posted by two
writers in batches of 5,000), no MQTT, no outbox, no VEE.

    python benchmarks/serve_ingest.py [--concentrators 10] [--meters 100] [--days 1] [--profile FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from limits import influxd_ingest
from serving import metric, start_serve, until_healthy

from headend.localservers import InfluxServer, MosquittoServer, free_port
from headend.model import IMPORT_INTERVAL
from headend.storage.codec import to_ns

ROOT = Path(__file__).resolve().parent.parent


def site(work: Path, broker: int, influx_url: str, api: int, concentrators: int, meters: int,
         inline_writer: bool = False) -> str:  # fmt: skip
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
{"[storage.writer]" + chr(10) + "own_process = false" if inline_writer else ""}
[api]
port = {api}
[[links]]
id = "broker"
kind = "mqtt"
host = "127.0.0.1"
port = {broker}
{body}"""


async def written(client: httpx.AsyncClient) -> int:
    """Values serve's writer has had confirmed by InfluxDB (cheap to ask, unlike a count)."""
    return int(metric((await client.get("/metrics")).text, "headend_writer_written_readings"))


async def check(influx_url: str, summary: dict[str, Any]) -> int:
    """Every interval value the simulator published is in InfluxDB once: per meter, the count
    and the sum of the raw numbers (exact integers) over the backlog's time range match (VEE
    may have re-read intervals before it, which the meters do have). Returns the meters."""
    first, last = (to_ns(datetime.fromisoformat(summary[k])) for k in ("first", "last"))
    q = (f'SELECT count("raw"), sum("raw") FROM "interval" WHERE "channel" = \'{IMPORT_INTERVAL}\' '
         f'AND time >= {first} AND time <= {last} GROUP BY "meter"')  # fmt: skip
    async with httpx.AsyncClient(base_url=influx_url, timeout=60) as client:
        answer = (await client.get("/query", params={"db": "serve", "q": q})).json()
    stored = {series["tags"]["meter"]: [int(series["values"][0][1]), round(series["values"][0][2])]
              for series in answer["results"][0].get("series", [])}  # fmt: skip
    expected = summary["intervals"]
    wrong = {m: (stored.get(m), want) for m, want in expected.items() if stored.get(m) != want}
    assert not wrong and len(stored) == len(expected), f"lost or doubled: {list(wrong.items())[:5]}"
    return len(expected)


async def run(args: argparse.Namespace, work: Path, broker: MosquittoServer, influx: InfluxServer) -> None:
    total = args.concentrators * args.meters * int(args.days * 96)
    api = free_port()
    (work / "site.toml").write_text(site(work, broker.port, influx.url, api, args.concentrators, args.meters,
                                            args.inline_writer))
    profile = ["-m", "cProfile", "-o", args.profile] if args.profile else []
    serve = await start_serve(work / "site.toml", log=work / "serve.log", python_args=tuple(profile))
    summary_file = work / "published.json"
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api}", timeout=30) as client:
            await until_healthy(client, serve, work / "serve.log")
            began = time.perf_counter()
            sim = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "simulators.mqtt_concentrator", "--broker", f"127.0.0.1:{broker.port}",
                "--concentrators", str(args.concentrators), "--meters", str(args.meters),
                "--backlog-days", str(args.days), "--start-delay", "0.5", "--summary", str(summary_file),
                cwd=ROOT, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            publishing = asyncio.get_running_loop().create_future()
            published = asyncio.get_running_loop().create_future()

            async def producer() -> None:
                assert sim.stdout is not None
                async for line in sim.stdout:
                    if b"publishing" in line:
                        publishing.set_result(time.perf_counter())
                    if b"published" in line:
                        published.set_result(time.perf_counter())

            watching = asyncio.create_task(producer())
            try:
                async with asyncio.timeout(1800):
                    await published
                    while not summary_file.exists():  # noqa: ASYNC110 - the simulator writes it next
                        await asyncio.sleep(0.01)
                    # Every value the backlog held (intervals and midnight registers) confirmed.
                    values = json.loads(summary_file.read_text())["values"]
                    while (confirmed := await written(client)) < values:
                        if args.timeline:
                            print(f"  {time.perf_counter() - began:6.2f} s: {confirmed:,} confirmed")
                        await asyncio.sleep(0.02)
                done = time.perf_counter()
                seconds = done - began
            finally:
                sim.terminate()
                await sim.wait()
                watching.cancel()
    finally:
        serve.terminate()
        await serve.wait()
    meters = await check(influx.url, json.loads(summary_file.read_text()))
    store_limit = await influxd_ingest(influx.url, total)
    start = publishing.result()
    rate = values / (done - start)
    print(f"{args.concentrators} concentrators x {args.meters} meters x {args.days:g} day(s) = {total:,} interval "
          f"values (+ {values - total:,} midnight registers) through headend serve (VEE on arrival on): "
          f"{rate:,.0f} values/s confirmed by InfluxDB, from the first message published to the last value confirmed "
          f"({done - start:.2f} s)")  # fmt: skip
    print(f"  nothing lost or doubled: {meters:,} meters' interval counts and raw sums in InfluxDB = as published")
    print(f"  the simulator published them all in {published.result() - start:.2f} s (its backlog made beforehand); "
          f"{seconds:.1f} s from its start, its own start-up and making included")  # fmt: skip
    print(f"  limit (same run): influxd taking the same points (line protocol made beforehand, 2 writers): "
          f"{store_limit:,.0f} values/s; ratio {rate / store_limit:.2f}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concentrators", type=int, default=10)
    p.add_argument("--meters", type=int, default=100)
    p.add_argument("--days", type=float, default=1)
    p.add_argument("--inline-writer", action="store_true",
                   help="the writer as a task of serve's event loop instead of its own process (for comparison)")
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
