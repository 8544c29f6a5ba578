"""The limits benchmarks compare the head-end with, measured in the same run: what influxd
takes on its own, and what the DLMS sessions do with no engine and no outbox."""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import UTC, datetime, timedelta

import httpx

from headend.model import IMPORT_ENERGY, IMPORT_INTERVAL, Obis, Reading
from headend.protocols.dlms.client import DlmsSession
from headend.storage import series
from headend.storage.influx import series_lines

PROFILE = Obis(1, 0, 99, 1, 0)
PASSWORD = b"12345678"  # the DLMS simulator's LLS password


async def influxd_ingest(influx_url: str, total: int) -> float:
    """Values/s influxd itself takes the same points at: the line protocol the head-end would
    write for them, made beforehand, posted in batches of 5,000 by two writers at once."""
    async with httpx.AsyncClient(base_url=influx_url, timeout=60) as client:
        await client.post("/query", params={"q": 'CREATE DATABASE "limit"'})
        t0, per_meter = datetime(2026, 3, 9, tzinfo=UTC), 96
        readings = [Reading(f"m{i // per_meter:05d}", IMPORT_INTERVAL, t0 + timedelta(minutes=15 * (i % per_meter + 1)),
                            0.123, raw=123, scaler=-3, unit="kWh", source="mqtt/dc-000")
                    for i in range(total)]  # fmt: skip
        lines = [line for s in series.of_readings(readings) for line in series_lines(s)]
        bodies = ["\n".join(lines[i : i + 5000]).encode() for i in range(0, total, 5000)]
        began = time.perf_counter()

        async def writer(part: list[bytes]) -> None:
            for body in part:
                response = await client.post("/write", params={"db": "limit", "precision": "ns"}, content=body)
                response.raise_for_status()

        await asyncio.gather(writer(bodies[0::2]), writer(bodies[1::2]))
        return total / (time.perf_counter() - began)


async def dlms_sessions_alone(ports: dict[str, int], concurrency: int, seconds: float | None = None) -> float:
    """Meters/s of the DLMS sessions a daily plan makes (LLS association, clock, a day of
    profile, the import register, release), `concurrency` at a time, no engine and no outbox:
    each meter once, or round and round for `seconds`."""
    meters = list(ports)
    turns = itertools.count()
    began = time.perf_counter()
    deadline = None if seconds is None else began + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        while True:
            n = next(turns)
            if (n >= len(meters)) if deadline is None else (time.perf_counter() >= deadline):
                return
            meter = meters[n % len(meters)]
            async with DlmsSession.tcp_wrapper("127.0.0.1", ports[meter], meter, authentication="lls",
                                               password=PASSWORD) as session:  # fmt: skip
                now = datetime.now(UTC)
                await session.read_clock()
                await session.read_profile(PROFILE, now - timedelta(days=1), now)
                await session.read_registers([IMPORT_ENERGY])
            done += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - began)
