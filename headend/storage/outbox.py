"""The durable outbox: a read is *accepted* once `accept()` has returned.

SQLite in WAL mode with synchronous=FULL: when the commit returns, the rows are on disk and
survive a crash or power cut. Only after that may a source be acknowledged (MQTT ack, poll
cursor). The writer drains the oldest rows to the ReadingStore and deletes only what the
store confirmed; a reading that the store refuses on its own is moved to `quarantine` with
the reason, never dropped.

A row holds a Series (one meter's channel, many values; `n` of them), so a message of 100
meters is 100 rows, not 9,600. The number of readings waiting is kept in `counters`, updated
in the transaction that changes it: `depth()` is one lookup, not a count over millions of
rows, and right whichever process (serve, a separate writer, the CLI) changed it.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from headend.model import Reading
from headend.storage import codec, series
from headend.storage.series import Series
from headend.storage.sqlite_db import connect_durable, write_transaction

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    body TEXT NOT NULL,
    accepted_ns INTEGER NOT NULL,
    n INTEGER NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS cursors (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY,
    body TEXT NOT NULL,
    reason TEXT NOT NULL,
    quarantined_ns INTEGER NOT NULL
);
"""


#: The depth counter set from the rows themselves.
_RECOUNT = "UPDATE counters SET value = (SELECT coalesce(sum(n), 0) FROM outbox) WHERE name = 'depth'"


@dataclass(frozen=True, slots=True)
class QuarantinedRow:
    id: int
    body: str
    reason: str
    quarantined_ns: int
    #: Readings (it can go back to the store); False for a raw message that never parsed.
    requeueable: bool
    #: How many readings it holds (0 for a raw message).
    readings: int = 0


def _decoded(body: str) -> Series | None:
    try:
        return series.decode(body)
    except Exception:  # noqa: BLE001 - anything that does not decode stays quarantined
        return None


@dataclass(frozen=True, slots=True)
class Pending:
    """A row taken from the outbox for writing; `series` is None if its body no longer decodes."""

    id: int
    series: Series | None
    body: str
    #: Readings the row holds.
    n: int = 1

    @property
    def readings(self) -> list[Reading]:
        return [] if self.series is None else self.series.readings()


class WriterLocked(RuntimeError):
    """Another process is already draining this outbox."""


#: Raw messages (that never parsed) kept in quarantine at most; past it they are counted and
#: logged but not kept, so a flood of distinct garbage cannot fill the disk. Readings refused
#: by the store are real reads and are always kept.
MAX_RAW_QUARANTINE = 100_000
#: Bytes of one raw message kept as evidence; its size and SHA-256 name the whole.
MAX_RAW_BYTES = 16 * 1024
#: Bytes all raw messages in quarantine may take (as stored): the outbox's disk is the one
#: genuine reads are accepted on.
MAX_RAW_TOTAL = 256 * 1024 * 1024
#: Seconds between recounts of a full quarantine (a recount reads all of it).
RECOUNT_S = 10.0


def _raw_id(source: str, payload: bytes) -> int:
    """A negative id fixed by the content: the same message quarantined again (a retained
    message at every reconnect, a replay flood) is one row."""
    digest = hashlib.sha256(source.encode("utf-8", "surrogateescape") + b"\0" + payload).digest()
    return -1 - (int.from_bytes(digest[:8], "big") >> 1)


class Outbox:
    def __init__(self, path: str | Path, *, max_raw_quarantine: int = MAX_RAW_QUARANTINE,
                 max_raw_bytes: int = MAX_RAW_TOTAL) -> None:  # fmt: skip
        self.path = Path(path)
        self.max_raw_quarantine = max_raw_quarantine
        self.max_raw_bytes = max_raw_bytes
        # Counted once, then kept up to date here (counted again when at a cap).
        self._raw_rows: int | None = None
        self._raw_bytes: int | None = None
        self._counted_at = 0.0
        # One connection, used from worker threads one at a time under the lock.
        self._db = connect_durable(self.path, _SCHEMA)
        self._lock = threading.Lock()
        with self._lock, write_transaction(self._db) as db:
            columns = {row[1] for row in db.execute("PRAGMA table_info(outbox)")}
            if "n" not in columns:  # an outbox from before series: one reading per row
                db.execute("ALTER TABLE outbox ADD COLUMN n INTEGER NOT NULL DEFAULT 1")
            # Counted at every start: whatever changed the rows without the counter (an older
            # head-end during an upgrade, a hand-made repair) is not believed for long.
            db.execute("INSERT OR IGNORE INTO counters (name, value) VALUES ('depth', 0)")
            db.execute("INSERT OR IGNORE INTO counters (name, value) VALUES ('written', 0)")
            db.execute(_RECOUNT)
        # `depth()` reads through its own connection: WAL readers never wait for a writer, and
        # the event loop never waits for the lock a worker thread holds through an fsync.
        self._reader = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._reader_lock = threading.Lock()  # held for a lookup's microseconds, never over an fsync
        self._waiters: set[asyncio.Event] = set()
        self._writer_lock: IO[bytes] | None = None

    # -- accepting ---------------------------------------------------------------------

    def accept_sync(self, readings: Iterable[Reading], cursors: Mapping[str, int] | None = None) -> int:
        """Commit readings (and source cursors, in the same transaction) durably.

        Raises before writing anything if one reading does not encode.
        """
        return self.accept_series_sync(series.of_readings(readings), cursors)

    def accept_series_sync(self, items: Sequence[Series], cursors: Mapping[str, int] | None = None) -> int:
        rows = [(s.encode(), len(s)) for s in items if len(s)]
        if not rows and not cursors:
            return 0
        now = time.time_ns()
        total = sum(n for _, n in rows)
        with self._lock, write_transaction(self._db) as db:
            db.executemany("INSERT INTO outbox (body, accepted_ns, n) VALUES (?, ?, ?)",
                           [(body, now, n) for body, n in rows])  # fmt: skip
            if cursors:
                db.executemany("INSERT OR REPLACE INTO cursors (key, value) VALUES (?, ?)", list(cursors.items()))
            self._count(db, total)
        return total

    async def accept(self, readings: Sequence[Reading], *, cursors: Mapping[str, int] | None = None) -> int:
        """Durably accept readings. When this returns, the source may be acknowledged.

        `cursors` (e.g. the last sequence number taken from a source) commit atomically with
        the readings, so a source's position never runs ahead of what is stored.
        """
        return await self.accept_series(series.of_readings(readings), cursors=cursors)

    async def accept_series(self, items: Sequence[Series], *, cursors: Mapping[str, int] | None = None) -> int:
        """`accept` for readings already in series (a source that decodes straight into them)."""
        n = await asyncio.to_thread(self.accept_series_sync, items, cursors)
        for event in self._waiters:
            event.set()
        return n

    @staticmethod
    def _count(db: sqlite3.Connection, change: int) -> None:
        if change:
            db.execute("UPDATE counters SET value = value + ? WHERE name = 'depth'", (change,))

    # -- draining ----------------------------------------------------------------------

    def take_sync(self, limit: int, after: int = 0) -> list[Pending]:
        """The oldest rows (past row id `after`), as many as hold about `limit` readings (at
        least one row). Decoded after the lock is let go: accepts (and the acks waiting on
        them) do not wait for the decoding."""
        taken: list[tuple[int, str, int]] = []
        total = 0
        with self._lock:
            rows = self._db.execute("SELECT id, body, n FROM outbox WHERE id > ? ORDER BY id", (after,))
            try:
                for row in rows:
                    taken.append(row)
                    total += row[2]
                    if total >= limit:
                        break
            finally:
                rows.close()
        return [Pending(row_id, _decoded(body), body, n) for row_id, body, n in taken]

    async def take(self, limit: int, *, after: int = 0) -> list[Pending]:
        return await asyncio.to_thread(self.take_sync, limit, after)

    def settle_sync(self, done: Sequence[Pending], refused: Sequence[tuple[Reading, str]]) -> None:
        """Rows the store has taken are deleted, and the readings of them it refused are
        quarantined with its reason, in one transaction (a crash before it replays the rows,
        which the store absorbs)."""
        now = time.time_ns()
        held = []
        for reading, reason in refused:
            body = codec.encode(reading)
            held.append((_raw_id("refused", body.encode()), body, reason, now))
        with self._lock, write_transaction(self._db) as db:
            db.executemany("INSERT OR REPLACE INTO quarantine (id, body, reason, quarantined_ns) VALUES (?, ?, ?, ?)",
                           held)  # fmt: skip
            self._remove(db, done)
            # Counted with the deletion itself: exact whichever process writes, and whenever it dies.
            db.execute("UPDATE counters SET value = value + ? WHERE name = 'written'",
                       (sum(p.n for p in done) - len(refused),))  # fmt: skip

    async def settle(self, done: Sequence[Pending], refused: Sequence[tuple[Reading, str]]) -> None:
        await asyncio.to_thread(self.settle_sync, done, refused)

    def _remove(self, db: sqlite3.Connection, rows: Sequence[Pending]) -> None:
        before = db.total_changes
        db.executemany("DELETE FROM outbox WHERE id = ?", [(p.id,) for p in rows])
        if db.total_changes - before == len(rows):
            self._count(db, -sum(p.n for p in rows))
        else:  # a row was already gone (deleted by another process?): count again
            db.execute(_RECOUNT)

    def quarantine_sync(self, items: Sequence[Pending], reason: str) -> None:
        """Whole rows into quarantine (ones that no longer decode), under their outbox id."""
        now = time.time_ns()
        with self._lock, write_transaction(self._db) as db:
            db.executemany(
                "INSERT OR REPLACE INTO quarantine (id, body, reason, quarantined_ns) VALUES (?, ?, ?, ?)",
                [(p.id, p.body, reason, now) for p in items],
            )
            self._remove(db, items)

    async def quarantine(self, items: Sequence[Pending], reason: str) -> None:
        await asyncio.to_thread(self.quarantine_sync, items, reason)

    def cursors(self, prefix: str = "") -> dict[str, int]:
        """Cursors whose key starts with `prefix`: a range on the key's index (LIKE would scan
        every row, 10 ms at 100,000 cursors, once per meter read), read through the reader
        connection: the polling engine asks on the event loop, and must not wait for the lock a
        worker thread holds through a commit's fsync."""
        with self._reader_lock:
            if prefix:
                rows = self._reader.execute("SELECT key, value FROM cursors WHERE key >= ? AND key < ?",
                                            (prefix, prefix + "\U0010ffff")).fetchall()  # fmt: skip
            else:
                rows = self._reader.execute("SELECT key, value FROM cursors").fetchall()
        return {k: int(v) for k, v in rows if k.startswith(prefix)}

    async def quarantine_raw(self, source: str, payload: bytes, reason: str) -> bool:
        """Keep a message that never became readings (it does not parse), with the reason;
        False if it was not kept because the quarantine is at its cap on raw messages."""
        return await asyncio.to_thread(self.quarantine_raw_sync, source, payload, reason)

    def quarantine_raw_sync(self, source: str, payload: bytes, reason: str) -> bool:
        return self.quarantine_raw_many_sync([(source, payload, reason)]) == 1

    def quarantine_raw_many_sync(self, items: Sequence[tuple[str, bytes, str]]) -> int:
        """Keep many raw messages (source, payload, reason) in one transaction; returns how many
        are kept (already there counts as kept)."""
        kept = 0
        with self._lock, write_transaction(self._db) as db:
            if self._raw_rows is None or self._raw_bytes is None or (
                    self._full() and time.monotonic() - self._counted_at > RECOUNT_S):
                # Counted again when full (at most every RECOUNT_S): `quarantine drop-raw` in
                # another process makes room that this one must see.
                self._counted_at = time.monotonic()
                rows, size = db.execute("SELECT count(*), coalesce(sum(length(body)), 0) FROM quarantine "
                                        "WHERE id < 0").fetchone()  # fmt: skip
                self._raw_rows, self._raw_bytes = int(rows), int(size)
            for source, payload, reason in items:
                row_id = _raw_id(source, payload)
                if db.execute("SELECT 1 FROM quarantine WHERE id = ?", (row_id,)).fetchone() is not None:
                    kept += 1
                    continue
                if self._full():
                    continue
                part = payload[:MAX_RAW_BYTES]
                if len(part) < len(payload):
                    digest = hashlib.sha256(payload).hexdigest()
                    reason = f"{reason} [{len(payload)} bytes, sha256 {digest}, first {len(part)} kept]"
                body = f"{source} {part.hex()}"
                db.execute("INSERT INTO quarantine (id, body, reason, quarantined_ns) VALUES (?, ?, ?, ?)",
                           (row_id, body, reason, time.time_ns()))  # fmt: skip
                self._raw_rows += 1
                self._raw_bytes += len(body)
                kept += 1
        return kept

    def _full(self) -> bool:
        assert self._raw_rows is not None and self._raw_bytes is not None
        return self._raw_rows >= self.max_raw_quarantine or self._raw_bytes >= self.max_raw_bytes

    # -- state -------------------------------------------------------------------------

    def recount_sync(self) -> int:
        """Set the depth counter from the rows if it disagrees (the writer calls it when it
        finds the outbox empty, where counting costs nothing); returns the depth."""
        with self._lock:
            counted, rows = self._db.execute(
                "SELECT (SELECT value FROM counters WHERE name = 'depth'), (SELECT coalesce(sum(n), 0) FROM outbox)"
            ).fetchone()
            if counted == rows:
                return int(rows)
            with write_transaction(self._db) as db:
                db.execute(_RECOUNT)
                rows = db.execute("SELECT value FROM counters WHERE name = 'depth'").fetchone()[0]
        log.warning("outbox depth counter said %s, the rows hold %s: counted again", counted, rows)
        return int(rows)

    async def recount(self) -> int:
        return await asyncio.to_thread(self.recount_sync)

    def written(self) -> int:
        """Readings the store has confirmed from this outbox, ever (kept with the deletions)."""
        with self._reader_lock:
            row = self._reader.execute("SELECT value FROM counters WHERE name = 'written'").fetchone()
        return int(row[0]) if row else 0

    def depth(self) -> int:
        """Readings waiting for the store: one row's lookup, never a count."""
        with self._reader_lock:
            row = self._reader.execute("SELECT value FROM counters WHERE name = 'depth'").fetchone()
        return int(row[0]) if row else 0

    def quarantined(self) -> list[tuple[str, str]]:
        """(body, reason) of every quarantined row, oldest first."""
        with self._lock:
            return list(self._db.execute("SELECT body, reason FROM quarantine ORDER BY quarantined_ns, id"))

    def quarantine_rows(self) -> list[QuarantinedRow]:
        """Every quarantined row with its id and whether it can go back to the store."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, body, reason, quarantined_ns FROM quarantine ORDER BY quarantined_ns, id"
            ).fetchall()
        out = []
        for i, body, reason, ns in rows:
            decoded = _decoded(body)
            out.append(QuarantinedRow(i, body, reason, ns, decoded is not None, 0 if decoded is None else len(decoded)))
        return out

    def drop_raw_sync(self, ids: Sequence[int] | None = None) -> int:
        """Delete quarantined raw messages (all, or those `ids`); readings are never dropped."""
        wanted = None if ids is None else set(ids)
        raw = [r.id for r in self.quarantine_rows() if not r.requeueable and (wanted is None or r.id in wanted)]
        with self._lock, write_transaction(self._db) as db:
            db.executemany("DELETE FROM quarantine WHERE id = ?", [(i,) for i in raw])
            self._raw_rows = self._raw_bytes = None
        return len(raw)

    def hold_sync(self, readings: Sequence[Reading], reason: str) -> int:
        """Keep readings that must not reach the store as they are (an interval the head-end
        cannot place on the grid) in the quarantine, with the reason: the same reading held
        again on the next read is one row. Returns how many were new."""
        now = time.time_ns()
        rows = []
        for r in readings:
            body = codec.encode(r)
            key = f"held {r.kind} {r.meter} {r.channel} {r.timestamp.isoformat()} {r.value!r}"
            rows.append((_raw_id("held", key.encode()), body, reason, now))
        with self._lock, write_transaction(self._db) as db:
            before = db.total_changes
            db.executemany("INSERT OR IGNORE INTO quarantine (id, body, reason, quarantined_ns) VALUES (?, ?, ?, ?)",
                           rows)  # fmt: skip
            return db.total_changes - before

    def requeue_sync(self, ids: Sequence[int] | None = None) -> int:
        """Move quarantined readings (all, or those `ids`) back into the outbox, in one
        transaction: after the cause was fixed (a field type, a retention policy), the writer
        tries them again. Raw messages that never became readings stay where they are."""
        rows = [r for r in self.quarantine_rows() if r.requeueable and (ids is None or r.id in set(ids))]
        sizes = [r.readings for r in rows]
        now = time.time_ns()
        with self._lock, write_transaction(self._db) as db:
            db.executemany("INSERT INTO outbox (body, accepted_ns, n) VALUES (?, ?, ?)",
                           [(r.body, now, n) for r, n in zip(rows, sizes, strict=True)])  # fmt: skip
            db.executemany("DELETE FROM quarantine WHERE id = ?", [(r.id,) for r in rows])
            self._count(db, sum(sizes))
        for event in self._waiters:
            event.set()
        return sum(sizes)

    def new_data_event(self) -> asyncio.Event:
        """An event set whenever this process accepts readings (other processes are polled)."""
        event = asyncio.Event()
        self._waiters.add(event)
        return event

    def notify_new_data(self) -> None:
        """Wake this process's waiters: another process accepted readings (serve's writer
        process hears it from serve)."""
        for event in self._waiters:
            event.set()

    def lock_for_writer(self, wait: float = 0.0) -> None:
        """Make this process the only writer of the outbox; the OS frees the lock if it dies.

        `wait`: seconds to wait for a writer that is on its way out (the writer process of a
        serve that was just killed ends when it sees serve gone, a few ms later)."""
        handle = open(f"{self.path}.writer.lock", "wb")  # noqa: SIM115 - held for the process's life
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.close()
                    waited = f" (waited {wait:g} s for it to end)" if wait else ""
                    raise WriterLocked(f"{self.path} is already being drained by another process{waited}") from None
                time.sleep(0.05)
        handle.write(str(os.getpid()).encode())
        handle.flush()
        self._writer_lock = handle

    @property
    def writer_lock_fd(self) -> int | None:
        """The lock's descriptor, for a writer process to inherit (it then holds the lock too,
        for as long as it lives)."""
        return None if self._writer_lock is None else self._writer_lock.fileno()

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._reader.close()
        if self._writer_lock is not None:
            self._writer_lock.close()
            self._writer_lock = None
