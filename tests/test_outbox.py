"""The outbox accepts durably, atomically, and never drops what the store refuses."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from headend.model import InvalidReading, Reading
from headend.storage import codec
from headend.storage.base import StoreRejected, StoreUnavailable
from headend.storage.codec import to_ns
from headend.storage.influx import InfluxStore
from headend.storage.outbox import Outbox, WriterLocked
from headend.storage.series import Series
from headend.storage.sqlite import SqliteStore
from headend.storage.writer import BatchWriter
from tests.factories import IMPORT, T0, intervals


async def test_accepted_readings_are_on_disk_when_accept_returns(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite")
    assert await outbox.accept(list(intervals(1, 0, 100))) == 100
    # A second connection (another process after a crash) sees every row.
    other = sqlite3.connect(tmp_path / "outbox.sqlite")
    assert other.execute("SELECT sum(n) FROM outbox").fetchone()[0] == 100
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other.close()
    outbox.close()


async def test_outbox_runs_with_synchronous_full(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite")
    # 2 = FULL: the commit returns only after fsync.
    assert outbox._db.execute("PRAGMA synchronous").fetchone()[0] == 2
    outbox.close()


async def test_taken_rows_decode_back_to_the_same_readings(tmp_path: Path) -> None:
    """A row is one meter's channel (a series); take() gives whole rows, about as many
    readings as asked for, oldest first."""
    outbox = Outbox(tmp_path / "outbox.sqlite")
    first, second = list(intervals(1, 0, 10)), [*intervals(2, 0, 10), *intervals(3, 0, 5)]
    await outbox.accept(first)
    await outbox.accept(second)
    assert outbox.depth() == 25
    taken = await outbox.take(4)
    assert [r for p in taken for r in p.readings] == first
    await outbox.settle(taken, [])
    assert outbox.depth() == 15
    rest = await outbox.take(100)
    assert [r for p in rest for r in p.readings] == second and [p.n for p in rest] == [10, 5]
    outbox.close()


async def test_an_outbox_from_before_series_is_drained_as_it_was(tmp_path: Path) -> None:
    """Rows written one reading per row (the first wave's outbox) are read, counted and
    written like the rest after an upgrade: nothing accepted before is lost."""
    path = tmp_path / "outbox.sqlite"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL, "
                "accepted_ns INTEGER NOT NULL)")  # fmt: skip
    batch = list(intervals(1, 0, 3))
    old.executemany("INSERT INTO outbox (body, accepted_ns) VALUES (?, 0)", [(codec.encode(r),) for r in batch])
    old.commit()
    old.close()
    outbox = Outbox(path)
    await outbox.accept(list(intervals(2, 0, 2)))
    assert outbox.depth() == 5
    taken = await outbox.take(100)
    assert [r for p in taken for r in p.readings] == [*batch, *intervals(2, 0, 2)]
    await outbox.settle(taken, [])
    assert outbox.depth() == 0
    outbox.close()


def test_bad_values_are_refused_before_acceptance() -> None:
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(InvalidReading, match="only finite numbers"):
            Reading(meter="M001", channel=IMPORT, timestamp=T0, value=bad)


async def test_a_batch_with_an_unencodable_reading_is_refused_whole(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite")
    good = list(intervals(1, 0, 5))
    # Frozen dataclasses can still be forced; the outbox's own encoder is the last line of defence.
    broken = Reading(meter="M001", channel=IMPORT, timestamp=T0, value=1.0)
    object.__setattr__(broken, "value", float("nan"))
    with pytest.raises(ValueError, match="JSON compliant"):
        await outbox.accept([*good, broken])
    assert outbox.depth() == 0
    outbox.close()


async def test_only_one_writer_drains_an_outbox(tmp_path: Path) -> None:
    first = Outbox(tmp_path / "outbox.sqlite")
    second = Outbox(tmp_path / "outbox.sqlite")
    first.lock_for_writer()
    with pytest.raises(WriterLocked):
        second.lock_for_writer()
    first.close()
    second.lock_for_writer()
    second.close()


async def test_readings_the_store_refuses_are_quarantined_and_the_rest_written(
    tmp_path: Path, influx_store: InfluxStore
) -> None:
    # A real refusal: InfluxDB rejects a float `value` in a shard (a week in 2020 here) that
    # already holds `value` as a string; readings in other shards are unaffected.
    poison = Reading(meter="M002", channel=IMPORT, timestamp=datetime(2020, 6, 3, tzinfo=UTC), value=7.0)
    async with httpx.AsyncClient() as client:
        r = await client.post(
            f"{influx_store.url}/write",
            params={"db": influx_store.database},
            content=f'interval,channel={IMPORT},meter=M002 value="text" {to_ns(poison.timestamp) - 1000}',
        )
        assert r.status_code == 204
    outbox = Outbox(tmp_path / "outbox.sqlite")
    good = list(intervals(1, 0, 50))
    await outbox.accept([*good[:20], poison, *good[20:]])
    writer = BatchWriter(outbox, influx_store, batch_size=1000)
    task = asyncio.create_task(writer.run())
    async with asyncio.timeout(30):
        await writer.wait_drained()
    writer.stop()
    await task
    assert outbox.depth() == 0
    assert await influx_store.count() == 50  # every good reading, none of them lost with the poison
    quarantined = outbox.quarantined()
    assert len(quarantined) == 1
    assert '"m":"M002"' in quarantined[0][0]
    assert "field type conflict" in quarantined[0][1]
    assert writer.stats.quarantined == 1
    outbox.close()


async def test_quarantined_readings_go_back_to_the_store_once_the_cause_is_fixed(
    tmp_path: Path, influx_store: InfluxStore
) -> None:
    poison = Reading(meter="M003", channel=IMPORT, timestamp=datetime(2020, 9, 2, tzinfo=UTC), value=7.0)
    async with httpx.AsyncClient(base_url=influx_store.url) as client:
        line = f'interval,channel={IMPORT},meter=M003 value="text" {to_ns(poison.timestamp) - 1}'
        r = await client.post("/write", params={"db": influx_store.database}, content=line)
        assert r.status_code == 204
        outbox = Outbox(tmp_path / "outbox.sqlite")
        await outbox.accept([poison])
        await outbox.quarantine_raw("mqtt/dc-1", b"\xff not json", "does not parse")  # never a reading
        writer = BatchWriter(outbox, influx_store, batch_size=1000)
        await writer._write(await outbox.take(10))
        assert [r.requeueable for r in outbox.quarantine_rows()] == [False, True]  # oldest first
        # The fix: the shard holding the string-typed field is dropped.
        shards = (await client.get("/query", params={"q": "SHOW SHARDS"})).json()["results"][0]["series"]
        (shard,) = [v for s in shards if s["name"] == influx_store.database for v in s["values"]
                    if v[4] <= "2020-09-02T00:00:00Z" < v[5]]  # fmt: skip
        r = await client.post("/query", params={"q": f"DROP SHARD {shard[0]}"})
        assert r.status_code == 200
    assert outbox.requeue_sync() == 1
    assert [r.requeueable for r in outbox.quarantine_rows()] == [False]  # the raw message stays
    await writer._write(await outbox.take(10))
    assert outbox.depth() == 0 and outbox.quarantine_rows()[0].reason == "does not parse"
    stored = await influx_store.query("M003", IMPORT, poison.timestamp.replace(day=1), poison.timestamp)
    assert [x.value for x in stored] == [7.0]
    outbox.close()


def test_raw_quarantine_is_bounded_and_the_same_message_is_one_row(tmp_path: Path) -> None:
    """A flood of garbage on the broker cannot fill the disk: the same bytes again (a retained
    message at every reconnect) are one row, a huge message keeps its first 64 KiB with its
    size and digest, and past the cap raw messages are refused (counted by the caller), while
    quarantined readings are never dropped. Room made by another process (`quarantine
    drop-raw` while serve runs) is seen."""
    outbox = Outbox(tmp_path / "outbox.sqlite", max_raw_quarantine=3)
    try:
        for _ in range(5):
            assert outbox.quarantine_raw_sync("mqtt a/state", b"\x00garbage", "does not parse")
        huge = b"x" * (1 << 20)
        assert outbox.quarantine_raw_sync("mqtt a/data", huge, "does not parse")
        assert outbox.quarantine_raw_sync("mqtt a/data", b"other", "does not parse")
        assert not outbox.quarantine_raw_sync("mqtt a/data", b"one too many", "does not parse")
        assert outbox.quarantine_raw_sync("mqtt a/state", b"\x00garbage", "does not parse"), "already kept"
        rows = outbox.quarantine_rows()
        assert len(rows) == 3 and not any(r.requeueable for r in rows)
        big = next(r for r in rows if "1048576 bytes" in r.reason)
        assert len(big.body) < 16 * 1024 * 2 + 100 and "first 16384 kept" in big.reason
        other = Outbox(tmp_path / "outbox.sqlite")  # `headend quarantine drop-raw`, another process
        assert other.drop_raw_sync([big.id]) == 1
        other.close()
        outbox._counted_at = -1e9  # the recount is due (it runs at most every RECOUNT_S)
        assert outbox.quarantine_raw_sync("mqtt a/data", b"one too many", "does not parse"), "room again"
        assert outbox.drop_raw_sync() == 3 and outbox.quarantine_rows() == []
        small = Outbox(tmp_path / "small.sqlite", max_raw_bytes=3000)  # each row is about 2,000 bytes as stored
        assert small.quarantine_raw_sync("s", b"x" * 1000, "r") and small.quarantine_raw_sync("s", b"y" * 1000, "r")
        assert not small.quarantine_raw_sync("s", b"z" * 1000, "r"), "past the byte cap"
        small.close()
    finally:
        outbox.close()


def test_cursors_are_found_by_their_exact_prefix(tmp_path: Path) -> None:
    """A range on the key's index, not LIKE: no scan per meter read, and no case folding
    (LIKE matched meter "m1"'s cursors for "M1")."""
    outbox = Outbox(tmp_path / "outbox.sqlite")
    try:
        outbox.accept_sync([], cursors={"profile:M1:x": 1, "profile:m1:x": 2, "profile:M10:x": 3, "boundary:M1:t": 4})
        assert outbox.cursors("profile:M1:") == {"profile:M1:x": 1}
        assert outbox.cursors("profile:M1") == {"profile:M1:x": 1, "profile:M10:x": 3}
        assert len(outbox.cursors()) == 4
        plan = outbox._db.execute("EXPLAIN QUERY PLAN SELECT key FROM cursors WHERE key >= ? AND key < ?",
                                  ("a", "b")).fetchall()  # fmt: skip
        assert "SEARCH cursors USING" in str(plan) and "INDEX" in str(plan)
    finally:
        outbox.close()


async def test_batches_in_flight_together_lose_and_double_nothing_when_the_store_fails(tmp_path: Path) -> None:
    """Two batches on their way at once; the store fails the second of every three requests
    (one in flight lands, the other fails): every reading ends in the store once, the outbox
    empties, and its depth counter agrees with its rows all along."""
    calls = {"n": 0}

    class FlakyStore(SqliteStore):
        async def write_series(self, batch: Sequence[Series]) -> None:
            calls["n"] += 1
            await asyncio.sleep(0.001 * (calls["n"] % 3))  # they land out of order
            if calls["n"] % 3 == 2:
                raise StoreUnavailable("store busy")
            await super().write_series(batch)

    outbox = Outbox(tmp_path / "outbox.sqlite")
    store = FlakyStore(tmp_path / "readings.sqlite")
    writer = BatchWriter(outbox, store, batch_size=100, min_backoff=0.001, max_backoff=0.01, in_flight=2)
    for meter in range(1, 31):
        await outbox.accept(list(intervals(meter, 0, 96)))
    task = asyncio.create_task(writer.run())
    async with asyncio.timeout(30):
        await writer.wait_drained()
    writer.stop()
    await task
    assert await store.count() == 30 * 96 and outbox.depth() == 0
    assert writer.stats.written == 30 * 96 and writer.stats.store_failures > 0
    assert outbox._db.execute("SELECT count(*) FROM outbox").fetchone()[0] == 0
    await store.close()
    outbox.close()


async def test_a_depth_counter_that_disagrees_with_the_rows_is_counted_again(tmp_path: Path) -> None:
    """Rows deleted behind the counter's back (an older head-end's writer during an upgrade):
    the writer finds the outbox empty and counts again, so `headend drain` and a stop do not
    wait for readings that are not there; a restart counts too."""
    outbox = Outbox(tmp_path / "outbox.sqlite")
    await outbox.accept(list(intervals(1, 0, 10)))
    other = sqlite3.connect(tmp_path / "outbox.sqlite")
    other.execute("DELETE FROM outbox")
    other.commit()
    assert outbox.depth() == 10
    writer = BatchWriter(outbox, SqliteStore(tmp_path / "readings.sqlite"), poll_interval=0.01)
    task = asyncio.create_task(writer.run())
    async with asyncio.timeout(10):
        await writer.wait_drained()
    writer.stop()
    await task
    assert outbox.depth() == 0
    other.execute("INSERT INTO outbox (body, accepted_ns, n) VALUES ('x', 0, 7)")
    other.commit()
    other.close()
    outbox.close()
    again = Outbox(tmp_path / "outbox.sqlite")
    assert again.depth() == 7
    again.close()


class OrderedStore(SqliteStore):
    """The first request is slow, then fails, is refused, or lands late (as `mode` says)."""

    def __init__(self, path: Path, mode: str) -> None:
        super().__init__(path)
        self.mode, self.calls = mode, 0

    async def write_series(self, batch: Sequence[Series]) -> None:
        self.calls += 1
        if self.calls == 1:
            await asyncio.sleep(0.1)  # a slow request: the next batch could land first
            if self.mode == "unavailable":
                raise StoreUnavailable("timeout")
        if self.mode == "rejected" and any(s.meter == "BAD" for s in batch):
            raise StoreRejected("400 field type conflict")
        await super().write_series(batch)


@pytest.mark.parametrize("mode", ["unavailable", "slow", "rejected"])
async def test_a_correction_is_stored_after_the_value_it_corrects_whatever_happens_in_flight(
    tmp_path: Path, mode: str
) -> None:
    """Two batches in flight at once: the second holds a correction of an interval in the
    first. Whether the first fails and is retried, lands late, or is halved around a refused
    reading, the correction is what stays stored."""
    outbox = Outbox(tmp_path / "outbox.sqlite")
    older = [Reading("M1", IMPORT, T0, 1.0, source="mqtt/dc-1")]
    if mode == "rejected":
        older.append(Reading("BAD", IMPORT, T0, 9.0, source="mqtt/dc-1"))
    await outbox.accept(older)
    await outbox.accept([Reading("M1", IMPORT, T0, 2.0, source="mqtt/dc-1")])
    store = OrderedStore(tmp_path / "readings.sqlite", mode)
    writer = BatchWriter(outbox, store, batch_size=len(older), min_backoff=0.01, poll_interval=0.05)
    task = asyncio.create_task(writer.run())
    async with asyncio.timeout(10):
        await writer.wait_drained()
    writer.stop()
    await task
    (stored,) = await store.query("M1", IMPORT, T0 - timedelta(minutes=15), T0)
    assert stored.value == 2.0 and writer.stats.written == 2
    await store.close()
    outbox.close()


ODD_ROWS = {
    "quality a number": '["s1","interval","M1","1-0:1.29.0.255","","",1.0,0,[1773051300000000000],[1.0],null,null,[5]]',
    "meter a number": '["s1","interval",7,"1-0:1.29.0.255","","",1.0,0,[1773051300000000000],[1.0],null,null,[""]]',
    "time a text": '["s1","interval","M1","1-0:1.29.0.255","","",1.0,0,["x"],[1.0],null,null,[""]]',
    "columns of other lengths": '["s1","interval","M1","1-0:1.29.0.255","","",1.0,0,[1,2],[1.0],null,null,[""]]',
    "not a series": '["s2","interval"]',
}


@pytest.mark.parametrize("name", list(ODD_ROWS))
async def test_a_row_that_is_not_a_sound_series_is_quarantined_and_the_rest_written(
    tmp_path: Path, name: str, influx_store: InfluxStore
) -> None:
    outbox = Outbox(tmp_path / "outbox.sqlite")
    outbox._db.execute("INSERT INTO outbox (body, accepted_ns, n) VALUES (?, 0, 1)", (ODD_ROWS[name],))
    await outbox.accept([Reading("M2", IMPORT, T0, 1.0)])
    writer = BatchWriter(outbox, influx_store, batch_size=1, min_backoff=0.01, poll_interval=0.05)
    task = asyncio.create_task(writer.run())
    async with asyncio.timeout(10):
        await writer.wait_drained()
    writer.stop()
    await task
    assert outbox.depth() == 0 and await influx_store.count() == 1
    assert [r.reason for r in outbox.quarantine_rows()] == ["outbox row does not decode into readings"]
    outbox.close()
