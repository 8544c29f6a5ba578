"""SQLite connections as the outbox and the SQLite store both need them: durable and explicit."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class StateFileError(RuntimeError):
    """A state database (outbox, journal, ...) cannot be opened: the message names the file."""


def connect_durable(path: Path, schema: str = "") -> sqlite3.Connection:
    """WAL journal, synchronous=FULL (a commit returns after fsync), transactions opened by
    hand, `schema` created. A file that cannot be opened (disk full, read-only, not ours) is
    a StateFileError naming it, not a traceback."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            db.close()
            raise StateFileError(f"{path}: SQLite refused WAL mode (got {mode!r})")
        db.execute("PRAGMA synchronous=FULL")
        if schema:
            db.executescript(schema)
    except (sqlite3.Error, OSError) as exc:
        raise StateFileError(f"cannot open {path}: {exc} (disk full? read-only? not writable by this user?)") from exc
    return db


@contextmanager
def write_transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class DurableStore:
    """A small SQLite-backed record (command journal, VEE versions): durable connection,
    schema created on open, one lock around every use from any thread."""

    def __init__(self, path: str | Path, schema: str) -> None:
        self._db = connect_durable(Path(path), schema)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()
