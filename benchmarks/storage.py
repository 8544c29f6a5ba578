"""Values per second through the storage pipeline (outbox -> batch writer -> store).

Starts its own influxd on free loopback ports in a temp dir (Debian's `influxdb` package),
then for each store: accepts N interval values into the durable outbox in chunks (as
protocol drivers do) while the writer drains, and reports
- accept: values/s committed to the outbox (WAL, synchronous=FULL),
- end-to-end: values/s from the first accept until the outbox is empty,
- query: values/s read back,
- the limit it is compared with, measured in the same run: the same values written straight
  to a fresh store in the same batches (no outbox, no writer), and the ratio.

    python benchmarks/storage.py [--values 200000] [--chunk 1000] [--batch 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from headend.localservers import InfluxServer
from headend.model import Obis, Reading
from headend.storage.base import ReadingStore
from headend.storage.influx import InfluxStore
from headend.storage.outbox import Outbox
from headend.storage.sqlite import SqliteStore
from headend.storage.writer import BatchWriter

IMPORT = Obis.parse("1-0:1.8.0.255")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
STEP = timedelta(minutes=15)
METERS = 100


def make_chunks(values: int, chunk: int) -> list[list[Reading]]:
    per_meter = values // METERS
    chunks = []
    for start in range(0, per_meter, chunk):
        for m in range(METERS):
            chunks.append(
                [
                    Reading.from_raw(
                        f"BENCH-{m:04d}", IMPORT, T0 + (i + 1) * STEP, 1000 + i, scaler=-3, unit="kWh", source="bench"
                    )
                    for i in range(start, min(start + chunk, per_meter))
                ]
            )
    return chunks


async def alone(store: ReadingStore, chunks: list[list[Reading]], batch: int) -> float:
    """The limit: values/s of the same values written straight to a fresh store, in batches
    of `batch`, no outbox and no writer."""
    await store.open()
    values = [r for c in chunks for r in c]
    began = time.perf_counter()
    for first in range(0, len(values), batch):
        await store.write(values[first : first + batch])
    took = time.perf_counter() - began
    await store.close()
    return len(values) / took


async def run(name: str, store: ReadingStore, workdir: Path, chunks: list[list[Reading]], batch: int,
              fresh: ReadingStore) -> None:  # fmt: skip
    await store.open()
    outbox = Outbox(workdir / f"{name}-outbox.sqlite")
    writer = BatchWriter(outbox, store, batch_size=batch)
    task = asyncio.create_task(writer.run())
    total = sum(len(c) for c in chunks)
    t0 = time.perf_counter()
    for c in chunks:
        await outbox.accept(c)
    t_accept = time.perf_counter() - t0
    await writer.wait_drained()
    t_all = time.perf_counter() - t0
    writer.stop()
    await task
    t1 = time.perf_counter()
    got = 0
    for m in range(METERS):
        got += len(await store.query(f"BENCH-{m:04d}", IMPORT, T0, T0 + timedelta(days=3650)))
    t_query = time.perf_counter() - t1
    assert got == total, f"{name}: {got} of {total} values came back"
    await store.close()
    outbox.close()
    limit = await alone(fresh, chunks, batch)
    print(
        f"{name:8s} {total:>8d} values  accept {total / t_accept:>9.0f}/s  "
        f"end-to-end {total / t_all:>9.0f}/s  query {total / t_query:>9.0f}/s  "
        f"limit (same run, the store alone) {limit:>9.0f}/s  ratio {total / t_all / limit:.2f}"
    )


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--values", type=int, default=200_000)
    p.add_argument("--chunk", type=int, default=1000, help="values per accept() call")
    p.add_argument("--batch", type=int, default=5000, help="values per store write")
    args = p.parse_args()
    chunks = make_chunks(args.values, args.chunk)
    print(
        f"{platform.python_implementation()} {platform.python_version()}, {platform.machine()}, "
        f"{METERS} meters, accept chunk {args.chunk}, write batch {args.batch}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with InfluxServer(work / "influxd") as influx:
            await run("influxdb", InfluxStore(influx.url, "bench"), work, chunks, args.batch,
                      InfluxStore(influx.url, "alone"))  # fmt: skip
        await run("sqlite", SqliteStore(work / "readings.sqlite"), work, chunks, args.batch,
                  SqliteStore(work / "alone.sqlite"))  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
