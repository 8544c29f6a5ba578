"""Interval values per second from concentrators over MQTT into InfluxDB.

Starts mosquitto and influxd on free loopback ports (Debian packages), the concentrator
simulator in its own process (`python -m simulators.mqtt_concentrator --backlog-days D`,
which publishes D days of 15-minute intervals of K x N meters at once), and the head-end's
ConcentratorLink -> outbox -> batch writer -> InfluxStore in this process. Reports values/s
from the first message to the last value confirmed by InfluxDB, and the limit it is compared
with, measured in the same run: influxd taking the same points (benchmarks/limits.py).

    python benchmarks/mqtt_ingest.py [--concentrators 10] [--meters 100] [--days 1]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

from limits import influxd_ingest

from headend.localservers import InfluxServer, MosquittoServer
from headend.protocols.mqtt import ConcentratorLink
from headend.storage.influx import InfluxStore
from headend.storage.outbox import Outbox
from headend.storage.writer import BatchWriter

ROOT = Path(__file__).resolve().parent.parent


async def run(args: argparse.Namespace, work: Path, broker: MosquittoServer, influx: InfluxServer) -> None:
    total = args.concentrators * args.meters * int(args.days * 96)
    store = InfluxStore(influx.url, "bench")
    await store.open()
    outbox = Outbox(work / "outbox.sqlite")
    writer = BatchWriter(outbox, store, batch_size=5000)
    writer_task = asyncio.create_task(writer.run())
    async with ConcentratorLink("127.0.0.1", broker.port, outbox, headend_id="bench") as link:
        await link.connected.wait()
        sim = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "simulators.mqtt_concentrator", "--broker", f"127.0.0.1:{broker.port}",
            "--concentrators", str(args.concentrators), "--meters", str(args.meters),
            "--backlog-days", str(args.days),
            cwd=ROOT, stdout=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            await link.until(lambda: link.stats.accepted_readings > 0, timeout=120)
            t0 = time.perf_counter()
            await link.until(lambda: link.stats.accepted_readings >= total, timeout=600)
            t_accept = time.perf_counter() - t0
            await writer.wait_drained()
            t_all = time.perf_counter() - t0
        finally:
            sim.terminate()
            await sim.wait()
    writer.stop()
    await writer_task
    stored = await store.count()
    assert stored == total, f"{stored} of {total} values in InfluxDB"
    print(
        f"{args.concentrators} concentrators x {args.meters} meters x {args.days:g} day(s) = {total} values: "
        f"accepted (durable) {total / t_accept:,.0f}/s, in InfluxDB {total / t_all:,.0f}/s"
    )
    influxd = await influxd_ingest(influx.url, total)
    print(f"  limit (same run): influxd takes the same points at {influxd:,.0f}/s (line protocol made beforehand, "
          f"2 writers); ratio {total / t_all / influxd:.2f}")  # fmt: skip
    await store.close()
    outbox.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concentrators", type=int, default=10)
    p.add_argument("--meters", type=int, default=100)
    p.add_argument("--days", type=float, default=1)
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print(f"{platform.python_implementation()} {platform.python_version()}, simulator in its own process")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with MosquittoServer(work / "mosquitto") as broker, InfluxServer(work / "influxd") as influx:
            asyncio.run(run(args, work, broker, influx))


if __name__ == "__main__":
    main()
