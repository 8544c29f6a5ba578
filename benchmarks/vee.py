"""How fast VEE validates and the billing export answers.

Writes M meters x (D days + 4 weeks of like-day history) of 15-minute data into a store
(half as cumulative load profiles, half as interval energies, a few with gaps so
estimation runs), then measures
- validate: meter-periods/s through VeeService.validate (load, rules, estimation, versions),
- export: the same through GET /billing/export (JSON, MeterReadings) over HTTP,
- arrival: the cost the writer's VEE hook adds per stored value.

    python benchmarks/vee.py [--meters 100] [--days 30] [--store sqlite|influx]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import httpx
from fastapi import FastAPI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from headend.api.auth import TokenStore
from headend.api.billing import billing_router
from headend.config import parse_config
from headend.localservers import InfluxServer
from headend.registry import Registry
from headend.storage.base import ReadingStore
from headend.storage.influx import InfluxStore
from headend.storage.series import of_readings
from headend.storage.sqlite import SqliteStore
from headend.vee.arrival import ArrivalValidator
from headend.vee.energies import IMPORT
from headend.vee.service import VeeService
from headend.vee.store import VeeStore
from tests.vee_data import PER_DAY, STEP, T0, cumulative, deltas

WEEKS = 4


async def run(meters: int, days: int, store: ReadingStore, work: Path) -> None:
    ids = [f"B{i:04d}" for i in range(meters)]
    n = (WEEKS * 7 + days) * PER_DAY
    start = T0 + timedelta(weeks=WEEKS)
    end = start + days * PER_DAY * STEP
    t = time.perf_counter()
    for i, m in enumerate(ids):
        gap = set(range(n - 500, n - 490)) if i % 10 == 0 else set()
        make = cumulative if i % 2 else deltas
        await store.write(make(m, n, seed=i, change=lambda k, v, gap=gap: None if k in gap else v))
    print(f"wrote {meters * n:,} values in {time.perf_counter() - t:.1f} s")
    cfg = parse_config({"links": [{"id": "l", "kind": "tcp", "protocol": "dlms-wrapper", "host": "h", "port": 1}],
                        "meters": [{"id": m, "link": "l"} for m in ids]})  # fmt: skip
    versions = VeeStore(work / "vee.sqlite")
    vee = VeeService(store, versions, Registry(cfg), cfg.vee)

    lags: list[float] = []

    async def ticker() -> None:  # how long other work on the event loop waits meanwhile
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - before - 0.01)

    tick = asyncio.create_task(ticker())
    t = time.perf_counter()
    for m in ids:
        await vee.validate(m, start, end)
    took = time.perf_counter() - t
    tick.cancel()
    p99 = sorted(lags)[int(len(lags) * 0.99)]
    print(f"validate: {meters / took:.1f} meter-periods/s ({days} days each, {took / meters * 1000:.0f} ms each); "
          f"event loop lag meanwhile: max {max(lags) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    # The limit, measured now: the same queries a validation makes (five weeks of intervals,
    # registers, events), their answers turned into columns, and nothing else.
    t = time.perf_counter()
    for m in ids:
        await vee._fetch(vee.registry.meter(m), start, end, IMPORT)
    alone = meters / (time.perf_counter() - t)
    print(f"limit, the same rows read alone: {alone:.1f} meter-periods/s; "
          f"validation runs at {meters / took / alone:.2f} of it")

    token = TokenStore.issue(work / "tokens.toml", "bench", frozenset({"billing"}))
    app = FastAPI()
    app.include_router(billing_router(vee, TokenStore.load(work / "tokens.toml")))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://b", timeout=600) as client:
        t = time.perf_counter()
        size = 0
        for chunk in range(0, meters, 50):
            params = {"start": start.isoformat(), "end": end.isoformat(), "meter": ids[chunk : chunk + 50]}
            r = await client.get("/billing/export", params=params, headers={"Authorization": f"Bearer {token}"})
            r.raise_for_status()
            size += len(r.content)
        took = time.perf_counter() - t
    print(f"export JSON: {meters / took:.1f} meter-periods/s, {size / took / 1e6:.1f} MB/s, "
          f"{meters * days * PER_DAY / took:,.0f} intervals/s")  # fmt: skip

    arrival = ArrivalValidator(vee)
    batch = of_readings(deltas(ids[0], PER_DAY, start=end - PER_DAY * STEP))
    t = time.perf_counter()
    rounds = 20
    for _ in range(rounds):
        await arrival.before_write(batch)
        await arrival.after_write(batch)
        await arrival.drain()
    took = time.perf_counter() - t
    print(f"on arrival: {took / rounds * 1000:.0f} ms per one-meter day batch (conflict check + validation)")
    versions.close()


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--meters", type=int, default=100)
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--store", choices=["sqlite", "influx"], default="sqlite")
    args = p.parse_args()
    print(f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, store {args.store}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.store == "sqlite":
            async with SqliteStore(work / "readings.sqlite") as store:
                await run(args.meters, args.days, store, work)
        else:
            with InfluxServer(work / "influx") as server:
                async with InfluxStore(server.url, "bench") as store:
                    await run(args.meters, args.days, store, work)


if __name__ == "__main__":
    asyncio.run(main())
