"""Acceptance of the storage pipeline against a real influxd: nothing accepted is ever lost."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from headend.config import StorageConfig
from headend.localservers import InfluxServer
from headend.storage.base import StoreError
from headend.storage.influx import InfluxStore
from headend.storage.outbox import Outbox
from headend.storage.pipeline import Pipeline
from headend.storage.writer import BatchWriter
from tests.conftest import fresh_database
from tests.factories import IMPORT, PROFILE_STEP, T0, interval_quality, interval_value, intervals

ROOT = Path(__file__).resolve().parent.parent


async def assert_all_present(store: InfluxStore, per_meter: dict[int, int]) -> None:
    """Each meter m holds exactly intervals 0..per_meter[m]-1, with values and quality intact."""
    for meter_no, n in per_meter.items():
        got = await store.query(f"M{meter_no:03d}", IMPORT, T0, T0 + (n + 10) * PROFILE_STEP)
        assert len(got) == n, f"M{meter_no:03d}: {len(got)} of {n} intervals"
        assert len({r.timestamp for r in got}) == n, "a timestamp came back twice"
        for i, r in enumerate(got):
            assert r.timestamp == T0 + (i + 1) * PROFILE_STEP
            assert r.value == interval_value(meter_no, i)
            assert r.qualities == interval_quality(i)


async def test_100k_interval_values_come_back_intact(tmp_path: Path, influx_store: InfluxStore) -> None:
    meters, per_meter = 10, 10_000
    outbox = Outbox(tmp_path / "outbox.sqlite")
    writer = BatchWriter(outbox, influx_store, batch_size=5000)
    task = asyncio.create_task(writer.run())
    for start in range(0, per_meter, 2500):
        for m in range(1, meters + 1):
            await outbox.accept(list(intervals(m, start, start + 2500)))
    async with asyncio.timeout(120):
        await writer.wait_drained()
    writer.stop()
    await task
    assert outbox.depth() == 0
    assert await influx_store.count() == meters * per_meter
    await assert_all_present(influx_store, dict.fromkeys(range(1, meters + 1), per_meter))
    outbox.close()


async def test_influxd_down_for_10s_while_writing_loses_nothing(
    tmp_path: Path, own_influx_server: InfluxServer
) -> None:
    store = InfluxStore(own_influx_server.url, "headend")
    await store.open()
    outbox = Outbox(tmp_path / "outbox.sqlite")
    writer = BatchWriter(outbox, store, batch_size=1000, max_backoff=1.0)
    task = asyncio.create_task(writer.run())
    meters, chunk = 3, 200
    accepted = dict.fromkeys(range(1, meters + 1), 0)

    stop = asyncio.Event()

    async def produce(chunks: int) -> None:
        for _ in range(chunks):
            if stop.is_set():
                return
            for m in range(1, meters + 1):
                await outbox.accept(list(intervals(m, accepted[m], accepted[m] + chunk)))
                accepted[m] += chunk
            await asyncio.sleep(0.05)  # pacing a steady stream of reads, not waiting on anything

    await produce(10)
    async with asyncio.timeout(30):
        await writer.wait_drained()
    # Stop influxd in the middle of a stream of writes, keep accepting for the 10 s it is away.
    producer = asyncio.create_task(produce(1_000_000))
    await asyncio.sleep(0.3)
    await asyncio.to_thread(own_influx_server.stop)
    await asyncio.sleep(10)
    assert writer.stats.store_failures > 0
    assert outbox.depth() > 0, "readings kept arriving while the store was away"
    await asyncio.to_thread(own_influx_server.start)
    await asyncio.sleep(0.5)
    stop.set()  # not cancel(): a cancelled accept may have committed without being counted
    await producer
    async with asyncio.timeout(60):
        await writer.wait_drained()
    writer.stop()
    await task
    assert outbox.depth() == 0
    await assert_all_present(store, accepted)
    await store.close()
    outbox.close()


def run_worker(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.pipeline_worker", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def read_until(proc: subprocess.Popen[str], prefix: str) -> int:
    """Read the worker's lines until one starts with `prefix`; return the last ACCEPTED count."""
    assert proc.stdout is not None
    accepted = 0
    for line in proc.stdout:
        if line.startswith("ACCEPTED"):
            accepted = int(line.split()[1])
        if line.startswith(prefix):
            return accepted
    raise AssertionError(f"worker exited ({proc.wait()}) before printing {prefix}")


def outbox_depth(tmp_path: Path) -> int:
    outbox = Outbox(tmp_path / "outbox.sqlite")
    try:
        return outbox.depth()
    finally:
        outbox.close()


async def crash_and_recover(
    tmp_path: Path, influx_server: InfluxServer, *, kill_at: str, extra: list[str], frozen: bool
) -> None:
    db = fresh_database()
    common = ["--outbox", str(tmp_path / "outbox.sqlite"), "--url", influx_server.url, "--db", db]
    meters, per_meter = 4, 5000
    proc = run_worker(*common, "--meters", str(meters), "--intervals", str(per_meter), *extra)
    accepted = await asyncio.to_thread(read_until, proc, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.stdout is not None
    proc.stdout.close()
    assert accepted > 0
    if frozen:
        assert outbox_depth(tmp_path) > 0, "killed between store and delete: the batch is still in the outbox"
    # Restart: the new process drains what the dead one had accepted.
    proc = run_worker(*common)
    await asyncio.to_thread(read_until, proc, "DRAINED")
    assert proc.wait(timeout=30) == 0
    assert proc.stdout is not None
    proc.stdout.close()
    assert outbox_depth(tmp_path) == 0
    store = InfluxStore(influx_server.url, db)
    # Readings go in per meter in chunks of 1000: every printed ACCEPTED chunk must be there.
    chunks = accepted // 1000
    per = {m: (chunks // meters + (1 if m <= chunks % meters else 0)) * 1000 for m in range(1, meters + 1)}
    for meter_no, n in per.items():
        got = await store.query(f"M{meter_no:03d}", IMPORT, T0, T0 + timedelta(days=365))
        assert len(got) >= n
        assert [r.value for r in got[:n]] == [interval_value(meter_no, i) for i in range(n)]
        assert len({r.timestamp for r in got}) == len(got)
    assert await store.count() >= accepted
    await store.close()


async def test_writer_killed_between_store_and_outbox_delete_loses_nothing(
    tmp_path: Path, influx_server: InfluxServer
) -> None:
    await crash_and_recover(
        tmp_path, influx_server, kill_at="STORED 3", extra=["--freeze-after-batch", "3"], frozen=True
    )


async def test_writer_killed_under_load_loses_nothing(tmp_path: Path, influx_server: InfluxServer) -> None:
    await crash_and_recover(tmp_path, influx_server, kill_at="ACCEPTED 12000", extra=[], frozen=False)


async def test_influxdb_with_authentication_takes_user_and_password(tmp_path: Path) -> None:
    with InfluxServer(tmp_path / "influx", auth=True) as server:
        async with httpx.AsyncClient(base_url=server.url) as client:  # the first admin needs no credentials
            admin = "CREATE USER headend WITH PASSWORD 's3cret' WITH ALL PRIVILEGES"
            r = await client.post("/query", params={"q": admin})
            assert r.status_code == 200, r.text
        readings = list(intervals(1, 0, 10))
        async with InfluxStore(server.url, "authdb", username="headend", password="s3cret") as store:
            await store.write(readings)
            assert await store.query("M001", IMPORT, T0, T0 + timedelta(days=1)) == readings
        wrong = InfluxStore(server.url, "authdb", username="headend", password="wrong")
        with pytest.raises(StoreError, match="401"):  # a store error the writer retries, not a crash
            await wrong.open()
            await wrong.write(readings)
        await wrong.close()
        assert "s3cret" not in repr(InfluxStore(server.url, "authdb", username="headend", password="s3cret"))


async def test_the_head_end_starts_while_influxdb_is_down_and_writes_once_it_is_up(tmp_path: Path) -> None:
    """A head-end restarted during a database outage still starts and accepts reads; the
    writer creates the database and drains the outbox when InfluxDB comes back."""
    server = InfluxServer(tmp_path / "influx")  # its port chosen, not running yet
    cfg = StorageConfig.model_validate({"backend": "influx", "outbox": str(tmp_path / "outbox.sqlite"),
                                        "influx": {"url": server.url, "database": "late"},
                                        "writer": {"max_backoff": "0.2s"}})  # fmt: skip
    async with Pipeline(cfg, flush_timeout=0) as pipeline:
        await pipeline.outbox.accept(list(intervals(1, 0, 96)))
        assert pipeline.outbox.depth() == 96
        with server:
            async with asyncio.timeout(60):
                await pipeline.writer.wait_drained()
            store = InfluxStore(server.url, "late")
            assert len(await store.query("M001", IMPORT, T0, T0 + timedelta(days=1))) == 96
            await store.close()
