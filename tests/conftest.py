"""Fixtures that start real servers (influxd, mosquitto) on free loopback ports in temp dirs,
and processes that never outlive their test."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from headend.localservers import InfluxServer, MosquittoServer
from headend.storage.base import ReadingStore
from headend.storage.influx import InfluxStore
from headend.storage.sqlite import SqliteStore


@pytest.fixture(scope="session")
def influx_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxServer]:
    """One influxd for the whole run; tests keep apart by database name."""
    with InfluxServer(tmp_path_factory.mktemp("influxd")) as server:
        yield server


@pytest.fixture
def own_influx_server(tmp_path: Path) -> Iterator[InfluxServer]:
    """An influxd of the test's own, for tests that stop and restart it."""
    server = InfluxServer(tmp_path / "influxd")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mosquitto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoServer]:
    with MosquittoServer(tmp_path_factory.mktemp("mosquitto")) as server:
        yield server


def fresh_database() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def influx_store(influx_server: InfluxServer) -> AsyncIterator[InfluxStore]:
    store = InfluxStore(influx_server.url, fresh_database())
    await store.open()
    yield store
    await store.close()


@pytest.fixture(params=["sqlite", "influx"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ReadingStore]:
    """Every ReadingStore implementation, for the shared contract tests."""
    s: ReadingStore
    if request.param == "sqlite":
        s = SqliteStore(tmp_path / "readings.sqlite")
    else:
        s = InfluxStore(request.getfixturevalue("influx_server").url, fresh_database())
    await s.open()
    yield s
    await s.close()


Spawn = Callable[..., Awaitable[asyncio.subprocess.Process]]


@pytest.fixture
async def spawn() -> AsyncIterator[Spawn]:
    """`await spawn(*argv, **kwargs)` starts a process; any still running when the test ends
    (it failed half-way) is killed, so no server or worker outlives its test."""
    started: list[asyncio.subprocess.Process] = []

    async def run(*argv: str, **kwargs: object) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(*argv, **kwargs)  # type: ignore[arg-type]
        started.append(proc)
        return proc

    yield run
    for proc in started:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
