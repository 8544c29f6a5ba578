"""Versions of billing intervals and recorded meter exchanges, in SQLite next to the journal.

Raw reads stay as they were stored (version 0, in the ReadingStore). Every estimate and every
edit is a new version here with who, why, when and how; nothing is updated in place.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from headend.model import Obis
from headend.storage.codec import duration_ns, from_ns, to_ns
from headend.storage.sqlite_db import DurableStore, write_transaction
from headend.vee.series import Exchange

_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    meter TEXT NOT NULL,
    channel TEXT NOT NULL,
    ts INTEGER NOT NULL,
    version INTEGER NOT NULL,
    value REAL,
    status TEXT NOT NULL,
    method TEXT,
    qualities TEXT NOT NULL,
    author TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    PRIMARY KEY (meter, channel, ts, version)
);
CREATE TABLE IF NOT EXISTS conflicts (
    meter TEXT NOT NULL,
    channel TEXT NOT NULL,
    ts INTEGER NOT NULL,
    value REAL NOT NULL,
    seen_ns INTEGER NOT NULL,
    PRIMARY KEY (meter, channel, ts, value)
);
CREATE TABLE IF NOT EXISTS rereads (
    meter TEXT NOT NULL,
    gap_start INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    last_ns INTEGER NOT NULL,
    PRIMARY KEY (meter, gap_start)
);
CREATE TABLE IF NOT EXISTS exchanges (
    meter TEXT NOT NULL,
    ts INTEGER NOT NULL,
    baseline REAL NOT NULL,
    multiplier REAL NOT NULL,
    author TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    PRIMARY KEY (meter, ts)
);
"""


class DuplicateExchange(ValueError):
    pass


NewVersion = tuple[datetime, float | None, str | None, tuple[str, ...]]  # t, value, method, qualities


@dataclass(frozen=True)
class Version:
    meter: str
    channel: Obis
    t: datetime
    version: int
    value: float | None
    status: str  # estimated | edited
    method: str | None
    qualities: tuple[str, ...]
    author: str
    reason: str
    created: datetime


class VeeStore(DurableStore):
    def __init__(self, path: str | Path) -> None:
        super().__init__(path, _SCHEMA)

    def versions(self, meter: str, channel: Obis, start: datetime, end: datetime) -> dict[datetime, list[Version]]:
        """Every version of every interval in (start, end], oldest version first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT ts, version, value, status, method, qualities, author, reason, created_ns FROM versions"
                " WHERE meter = ? AND channel = ? AND ts > ? AND ts <= ? ORDER BY ts, version",
                (meter, str(channel), to_ns(start), to_ns(end)),
            ).fetchall()
        out: dict[datetime, list[Version]] = {}
        for ts, version, value, status, method, qualities, author, reason, created in rows:
            t = from_ns(ts)
            codes = tuple(json.loads(qualities))
            out.setdefault(t, []).append(
                Version(meter, channel, t, version, value, status, method, codes, author, reason, from_ns(created))
            )
        return out

    def add(self, meter: str, channel: Obis, t: datetime, value: float | None, *, status: str, method: str | None,
            qualities: tuple[str, ...], author: str, reason: str) -> int:  # fmt: skip
        """Store a new version of one interval; returns its number (raw is 0)."""
        return self.add_many(meter, channel, [(t, value, method, qualities)], status=status, author=author,
                             reason=reason)[0]  # fmt: skip

    def add_many(self, meter: str, channel: Obis, items: list[NewVersion], *, status: str, author: str,
                 reason: str) -> list[int]:  # fmt: skip
        numbers = []
        now = time.time_ns()
        with self._lock, write_transaction(self._db):
            for t, value, method, qualities in items:
                (latest,) = self._db.execute(
                    "SELECT coalesce(max(version), 0) FROM versions WHERE meter = ? AND channel = ? AND ts = ?",
                    (meter, str(channel), to_ns(t)),
                ).fetchone()
                number = latest + 1
                self._db.execute(
                    "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (meter, str(channel), to_ns(t), number, value, status, method, json.dumps(list(qualities)),
                     author, reason, now),
                )  # fmt: skip
                numbers.append(number)
        return numbers

    def record_conflicts(self, items: list[tuple[str, Obis, datetime, float]]) -> None:
        """Values that arrived for an interval that already had a different one (both kept)."""
        now = time.time_ns()
        with self._lock, write_transaction(self._db):
            self._db.executemany(
                "INSERT OR IGNORE INTO conflicts VALUES (?, ?, ?, ?, ?)",
                [(meter, str(channel), to_ns(t), value, now) for meter, channel, t, value in items],
            )

    def conflicts(self, meter: str, channel: Obis, start: datetime, end: datetime) -> dict[datetime, list[float]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT ts, value FROM conflicts WHERE meter = ? AND channel = ? AND ts > ? AND ts <= ? ORDER BY ts",
                (meter, str(channel), to_ns(start), to_ns(end)),
            ).fetchall()
        out: dict[datetime, list[float]] = {}
        for ts, value in rows:
            out.setdefault(from_ns(ts), []).append(value)
        return out

    def claim_rereads(self, meter: str, gaps: list[datetime], now: datetime, *, attempts: int,
                      spacing: timedelta) -> list[datetime]:  # fmt: skip
        """Of the gaps (by their first missing interval), those that may be asked of the meter
        again now, recorded as asked in the same transaction: at most `attempts` times each,
        the n-th no sooner than `spacing` x 2^(n-2) after the one before. Durable, so a
        restart or another validation of the same period never asks again early."""
        claimed = []
        now_ns = to_ns(now)
        with self._lock, write_transaction(self._db):
            for gap in gaps:
                row = self._db.execute("SELECT attempts, last_ns FROM rereads WHERE meter = ? AND gap_start = ?",
                                       (meter, to_ns(gap))).fetchone()  # fmt: skip
                done, last = row if row else (0, 0)
                if done >= attempts or (done and now_ns < last + duration_ns(spacing) * 2 ** (done - 1)):
                    continue
                self._db.execute("INSERT OR REPLACE INTO rereads VALUES (?, ?, ?, ?)",
                                 (meter, to_ns(gap), done + 1, now_ns))  # fmt: skip
                claimed.append(gap)
        return claimed

    def rereads(self, meter: str) -> dict[datetime, int]:
        """Re-reads asked so far, by the gap's first missing interval."""
        with self._lock:
            rows = self._db.execute("SELECT gap_start, attempts FROM rereads WHERE meter = ?", (meter,)).fetchall()
        return {from_ns(ts): n for ts, n in rows}

    def record_exchange(self, meter: str, exchange: Exchange, *, author: str, reason: str) -> None:
        try:
            with self._lock, write_transaction(self._db):
                self._db.execute(
                    "INSERT INTO exchanges VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (meter, to_ns(exchange.t), exchange.baseline, exchange.multiplier, author, reason, time.time_ns()),
                )
        except sqlite3.IntegrityError:
            raise DuplicateExchange(f"{meter}: an exchange at {exchange.t.isoformat()} is already recorded") from None

    def exchanges(self, meter: str) -> list[Exchange]:
        with self._lock:
            rows = self._db.execute(
                "SELECT ts, baseline, multiplier FROM exchanges WHERE meter = ? ORDER BY ts", (meter,)
            ).fetchall()
        return [Exchange(from_ns(ts), baseline, mult) for ts, baseline, mult in rows]
