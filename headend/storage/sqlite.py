"""SqliteStore: the embedded default store (demo, small sites, no servers to run)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from headend.model import Obis, Reading, ReadingKind, parse_obis
from headend.storage.base import ReadingStore
from headend.storage.codec import from_ns, to_ns
from headend.storage.columns import Columns
from headend.storage.series import Series
from headend.storage.sqlite_db import connect_durable, write_transaction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (
    kind TEXT NOT NULL,
    meter TEXT NOT NULL,
    channel TEXT NOT NULL,
    ts INTEGER NOT NULL,
    value REAL,
    raw REAL,
    scaler INTEGER NOT NULL,
    multiplier REAL NOT NULL,
    unit TEXT NOT NULL,
    quality TEXT NOT NULL,
    source TEXT NOT NULL,
    collected_at INTEGER NOT NULL,
    PRIMARY KEY (kind, meter, channel, ts)
) WITHOUT ROWID;
-- The few rows with quality codes, found without reading the rest: VEE asks for them apart
-- from the values (a tenth of a validation's time when it scanned the range for them).
CREATE INDEX IF NOT EXISTS readings_with_quality ON readings (kind, meter, channel, ts) WHERE quality != '';
"""

_COLUMNS = "kind, meter, channel, ts, value, raw, scaler, multiplier, unit, quality, source, collected_at"
_COLUMN_TYPES = np.dtype([("ts", np.int64), ("value", np.float64), ("multiplier", np.float64)])
_INSERT = f"INSERT OR REPLACE INTO readings ({_COLUMNS}) VALUES ({', '.join('?' * 12)})"


def _row(r: Reading) -> tuple[Any, ...]:
    return (
        r.kind,
        r.meter,
        str(r.channel),
        to_ns(r.timestamp),
        r.value,
        r.raw,
        r.scaler,
        r.multiplier,
        r.unit,
        ",".join(r.qualities),
        r.source,
        to_ns(r.collected_at),
    )


def _reading(row: tuple[Any, ...]) -> Reading:
    kind, meter, channel, ts, value, raw, scaler, multiplier, unit, quality, source, collected = row
    return Reading.stored(
        kind=kind,
        meter=meter,
        channel=parse_obis(channel),
        timestamp=from_ns(ts),
        value=value,
        raw=raw,
        scaler=scaler,
        multiplier=multiplier,
        unit=unit,
        qualities=tuple(quality.split(",")) if quality else (),
        source=source,
        collected_at=from_ns(collected),
    )


class SqliteStore(ReadingStore):
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            db = connect_durable(self.path)
            db.executescript(_SCHEMA)
            # Validation reads a meter's five weeks at a time: keep the hot pages in memory
            # (64 MiB of cache, up to 1 GiB mapped) rather than read them through the OS again.
            db.execute("PRAGMA cache_size = -65536")
            db.execute("PRAGMA mmap_size = 1073741824")
            self._db = db
        return self._db

    def _run(self, sql: str, params: Sequence[Any] = (), *, many: Sequence[Sequence[Any]] | None = None) -> list[Any]:
        with self._lock:
            db = self._connect()
            if many is None:
                return db.execute(sql, params).fetchall()
            with write_transaction(db):
                db.executemany(sql, many)
            return []

    async def open(self) -> None:
        await asyncio.to_thread(self._run, "SELECT 1")

    async def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    async def write(self, batch: Sequence[Reading]) -> None:
        if batch:
            await asyncio.to_thread(self._run, _INSERT, many=[_row(r) for r in batch])

    async def write_series(self, batch: Sequence[Series]) -> None:
        def rows() -> list[tuple[Any, ...]]:
            return [(s.kind, s.meter, channel, t, v, raw, scaler, s.multiplier, s.unit, q, s.source, c)
                    for s in batch if (channel := str(s.channel))
                    for t, v, raw, scaler, q, c in zip(s.times, s.values, s.raws, s.scalers, s.qualities, s.collected,
                                                       strict=True)]  # fmt: skip

        if batch:
            await asyncio.to_thread(lambda: self._run(_INSERT, many=rows()))

    async def query(
        self,
        meter: str,
        channel: Obis,
        start: datetime,
        end: datetime,
        kind: ReadingKind = "interval",
    ) -> list[Reading]:
        sql = (f"SELECT {_COLUMNS} FROM readings WHERE kind = ? AND meter = ? AND channel = ? "
               "AND ts > ? AND ts <= ? ORDER BY ts")  # fmt: skip
        params = (kind, meter, str(channel), to_ns(start), to_ns(end))
        # Turning rows into readings is most of a large query's time: off the event loop too.
        return await asyncio.to_thread(lambda: [_reading(row) for row in self._run(sql, params)])

    async def query_columns(self, meter: str, channel: Obis, start: datetime, end: datetime,
                            kind: ReadingKind = "interval") -> Columns:  # fmt: skip
        where = "kind = ? AND meter = ? AND channel = ? AND ts > ? AND ts <= ?"
        params = (kind, meter, str(channel), to_ns(start), to_ns(end))

        def columns() -> Columns:
            # Straight into arrays, no row tuples kept: a value-less row comes as +inf (stored
            # values are finite), and only the rows with quality codes bring their text.
            with self._lock:
                db = self._connect()
                rows = db.execute(f"SELECT ts, ifnull(value, 9e999), multiplier FROM readings WHERE {where} "
                                  "ORDER BY ts", params)  # fmt: skip
                table = np.fromiter(rows, dtype=_COLUMN_TYPES)
                coded = db.execute(f"SELECT ts, quality FROM readings INDEXED BY readings_with_quality "
                                   f"WHERE {where} AND quality != ''", params).fetchall()  # fmt: skip
            value = table["value"]
            value[np.isinf(value)] = np.nan
            quality = np.full(len(table), "", dtype=object)
            if coded:
                at = np.searchsorted(table["ts"], np.array([ts for ts, _q in coded], dtype=np.int64))
                quality[at] = [text for _ts, text in coded]
            return Columns(table["ts"].copy(), value.copy(), table["multiplier"].copy(), quality)

        return await asyncio.to_thread(columns)

    async def last_interval(self, meter: str, channel: Obis) -> datetime | None:
        rows = await asyncio.to_thread(
            self._run,
            "SELECT max(ts) FROM readings WHERE kind = 'interval' AND meter = ? AND channel = ?",
            (meter, str(channel)),
        )
        return None if rows[0][0] is None else from_ns(rows[0][0])

    async def count(self, kind: ReadingKind = "interval") -> int:
        rows = await asyncio.to_thread(self._run, "SELECT count(*) FROM readings WHERE kind = ?", (kind,))
        return int(rows[0][0])

    async def latest_intervals(self, channels: Sequence[Obis]) -> dict[tuple[str, Obis], datetime]:
        wanted = {str(c): c for c in channels}
        rows = await asyncio.to_thread(self._run, "SELECT meter, channel, max(ts) FROM readings "
                                       "WHERE kind = 'interval' GROUP BY meter, channel")  # fmt: skip
        return {(meter, wanted[channel]): from_ns(ts) for meter, channel, ts in rows if channel in wanted}

    async def interval_times(self, meters: Sequence[str], channel: Obis, start: datetime,
                             end: datetime) -> dict[str, set[datetime]]:  # fmt: skip
        def times() -> dict[str, set[datetime]]:
            # One seek on the primary key per meter, all in this thread: the table's key leads
            # with the meter, so a query across meters would read every row instead.
            sql = ("SELECT ts FROM readings WHERE kind = 'interval' AND meter = ? AND channel = ? AND ts > ? "
                   "AND ts <= ? AND value IS NOT NULL")  # fmt: skip
            bounds = (str(channel), to_ns(start), to_ns(end))
            return {m: {from_ns(ts) for (ts,) in self._run(sql, (m, *bounds))} for m in meters}

        return await asyncio.to_thread(times)
