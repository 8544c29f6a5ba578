"""The outbox's filesystem fills up (issue #14), against `headend serve` as a process on a
real small filesystem (a tmpfs mounted for the test): a start on a full disk exits with one
clear line naming the path; a disk that fills under load gives a clear error and a metric,
acknowledges nothing it did not store, and, once space is freed, every task recovers by
itself and everything the concentrator sent reaches the store."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from headend.localservers import MosquittoServer, free_port
from headend.storage.codec import to_ns
from simulators.clock import Clock
from simulators.mqtt_concentrator import SimulatedConcentrator
from tests.conftest import Spawn
from tests.serving import ROOT, Served, issue_tokens


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB filesystem of the test's own."""
    where = tmp_path / "small"
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill `disk` up to `leave` bytes of free space with one file; returns it."""
    filler = disk / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):
        while True:
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            if free <= leave:
                break
            f.write(b"\0" * min(65536, max(4096, free - leave)))
            f.flush()
    return filler


def site(directory: Path, outbox: Path, state: Path, api_port: int, body: str = "") -> None:
    (directory / "site.toml").write_text(f"""state_dir = "{state}"
[storage]
backend = "sqlite"
outbox = "{outbox}"
[storage.sqlite]
path = "{directory / "readings.sqlite"}"
[api]
port = {api_port}
tokens_file = "{directory / "tokens.toml"}"
{body}""")


async def test_a_start_on_a_full_disk_exits_with_one_clear_line(tmp_path: Path, small_disk: Path) -> None:
    site(tmp_path, small_disk / "outbox.sqlite", small_disk / "state", free_port())
    fill(small_disk)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "headend.cli", "serve", "--config", str(tmp_path / "site.toml"), cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _out, err = await asyncio.wait_for(proc.communicate(), 60)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 1
    assert "Traceback" not in err.decode()
    (line,) = [x for x in lines if x.startswith("headend:")]
    assert str(small_disk) in line and ("No space left" in line or "disk is full" in line or "I/O" in line), line


async def test_a_disk_that_fills_under_load_recovers_by_itself_and_loses_nothing(
    tmp_path: Path, small_disk: Path, spawn: Spawn, mosquitto_server: MosquittoServer
) -> None:
    dc_id = f"dc-{uuid.uuid4().hex[:8]}"
    meters = [f"{dc_id}-m{i}" for i in range(40)]
    api_port = free_port()
    body = f"""
[[links]]
id = "broker"
kind = "mqtt"
host = "127.0.0.1"
port = {mosquitto_server.port}
[[concentrators]]
id = "{dc_id}"
link = "broker"
""" + "".join(f'[[meters]]\nid = "{m}"\nconcentrator = "{dc_id}"\n' for m in meters)
    site(tmp_path, small_disk / "outbox.sqlite", tmp_path / "state", api_port, body)
    served = Served(tmp_path, f"http://127.0.0.1:{api_port}", issue_tokens(tmp_path), spawn)
    await served.start()
    dc = SimulatedConcentrator(dc_id, "127.0.0.1", mosquitto_server.port, meters, Clock(),
                               backlog=timedelta(days=2))  # fmt: skip
    try:
        await dc.start()
        filler = fill(small_disk, leave=64 * 1024)
        await dc.publish_until(dc.clock.datetime())  # two days of 40 meters at once
        expected = {(b.meter, to_ns(p.t)) for d in dc.sent.values() for b in d.blocks for p in b.readings}
        async with asyncio.timeout(60):
            while not saw_the_disk_full((await served.client.get("/metrics")).text):  # noqa: ASYNC110 - polling
                await asyncio.sleep(0.2)  # another process's metrics until it reports the full disk
        assert served.proc is not None and served.proc.returncode is None, "no crash"
        filler.unlink()  # an operator frees space; nobody restarts anything
        async with asyncio.timeout(120):
            while not expected <= stored(tmp_path / "readings.sqlite"):  # noqa: ASYNC110 - polling a file
                await asyncio.sleep(0.5)  # another process writes, until everything arrived
        status = (await served.client.get("/status", headers=served.auth("auditor"))).json()
        assert status["links"]["broker"] == "up"
        assert (await served.client.get("/health")).status_code == 200
    finally:
        await dc.stop()
        await served.stop()


def saw_the_disk_full(metrics: str) -> bool:
    """A task restarted (the link could not commit) or the writer counted outbox errors."""
    for line in metrics.splitlines():
        name, _, value = line.rpartition(" ")
        if name.startswith(("headend_task_restarts_total{", "headend_outbox_failures")) and float(value) > 0:
            return True
    return False


def stored(path: Path) -> set[tuple[str, int]]:
    """(meter, time) of every interval in the store."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            return set(db.execute("SELECT meter, ts FROM readings WHERE kind = 'interval'").fetchall())
    except sqlite3.OperationalError:
        return set()  # not made yet
