"""Long-lived tasks survive their own failures (issue #14): a bug in a concentrator link or a
writer hook, or the outbox's database failing, is logged, counted and got over, and no
reading is lost."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from headend.localservers import MosquittoServer
from headend.model import Reading
from headend.protocols.mqtt import ConcentratorLink
from headend.protocols.mqtt_schema import Block, Data, Point, State, data_topic, state_topic
from headend.storage.outbox import Outbox
from headend.storage.series import Series
from headend.storage.sqlite import SqliteStore
from headend.storage.writer import BatchWriter
from headend.supervisor import Supervisor
from tests.factories import intervals


async def test_a_crashing_concentrator_link_is_restarted_and_loses_nothing(
    tmp_path: Path, mosquitto_server: MosquittoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    dc = f"dc-{uuid.uuid4().hex[:8]}"
    outbox = Outbox(tmp_path / "outbox.sqlite")
    supervisor = Supervisor(min_backoff=0.05)
    accept = outbox.accept_series
    failures = {"left": 1}

    async def flaky_accept(items: Sequence[Series], **kwargs: Any) -> int:
        if failures["left"] and items:
            failures["left"] -= 1
            raise RuntimeError("a bug after the message arrived, before it was committed")
        return await accept(items, **kwargs)

    monkeypatch.setattr(outbox, "accept_series", flaky_accept)
    async with ConcentratorLink("127.0.0.1", mosquitto_server.port, outbox, headend_id=f"he-{dc}",
                                meters_of={dc: {"M1"}}, supervisor=supervisor) as link:  # fmt: skip
        await link.connected.wait()
        async with aiomqtt.Client("127.0.0.1", mosquitto_server.port, identifier=f"pub-{dc}") as client:
            birth = State(status="online", bdseq=1, seq=0, meters=[{"id": "M1"}])  # type: ignore[list-item]
            await client.publish(state_topic(dc), birth.model_dump_json(), qos=1, retain=True)
            block = Block(meter="M1", kind="interval", channel="1-0:1.29.0.255", unit="kWh", interval_s=900,
                          readings=[Point(t=datetime(2026, 3, 9, 10, 15, tzinfo=UTC), v=1.25)])  # fmt: skip
            await client.publish(data_topic(dc), Data(seq=1, blocks=[block]).model_dump_json(), qos=1)
        # The broker delivers the unacknowledged message again to the restarted link.
        await link.until(lambda: outbox.depth() == 1, timeout=30)
    assert supervisor.restarts == {f"mqtt-link-127.0.0.1:{mosquitto_server.port}": 1}
    assert [r.value for p in outbox.take_sync(10) for r in p.readings] == [1.25]
    outbox.close()


async def test_a_failing_writer_hook_never_holds_the_data_back(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite")
    store = SqliteStore(tmp_path / "readings.sqlite")
    await store.open()

    async def broken(_readings: Sequence[Reading]) -> None:
        raise RuntimeError("a bug in validation on arrival")

    writer = BatchWriter(outbox, store, before_write=broken, after_write=broken)
    await outbox.accept(list(intervals(1, 0, 10)))
    task = asyncio.create_task(writer.run())
    async with asyncio.timeout(10):
        await writer.wait_drained()
    writer.stop()
    await task
    assert outbox.depth() == 0 and len(await store.query("M001", next(intervals(1, 0, 1)).channel,
                                                            datetime(2000, 1, 1, tzinfo=UTC),
                                                            datetime(2100, 1, 1, tzinfo=UTC))) == 10  # fmt: skip
    assert writer.stats.hook_failures == 2 and writer.stats.healthy
    await store.close()
    outbox.close()


async def test_the_writer_rides_out_an_outbox_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite")
    store = SqliteStore(tmp_path / "readings.sqlite")
    await store.open()
    take = outbox.take
    failures = {"left": 2}

    async def full_disk(n: int, *, after: int = 0) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return await take(n, after=after)

    monkeypatch.setattr(outbox, "take", full_disk)
    writer = BatchWriter(outbox, store, min_backoff=0.01)
    await outbox.accept(list(intervals(1, 0, 10)))
    task = asyncio.create_task(writer.run())
    async with asyncio.timeout(10):
        await writer.wait_drained()
    writer.stop()
    await task
    assert outbox.depth() == 0 and writer.stats.outbox_failures == 2
    assert "disk is full" in (writer.stats.last_error or "")
    await store.close()
    outbox.close()
