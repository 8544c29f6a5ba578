"""The command journal: every switching command and every change of its state, durably.

SQLite (WAL, synchronous=FULL) behind a small interface (`create`, `transition`, `get`,
`find`, `open_for`) so PostgreSQL can take its place. A state change is committed before
the step it announces is taken: `sent` is on disk before the relay is operated.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from headend.model import RelayAction
from headend.storage.sqlite_db import DurableStore, write_transaction


class CommandState(StrEnum):
    REQUESTED = "requested"
    REJECTED = "rejected"
    QUEUED = "queued"
    SENT = "sent"
    CONFIRMED = "confirmed"
    #: A reconnect the meter accepted as ready_for_reconnection: the customer presses the button.
    CONFIRMED_READY = "confirmed_ready_for_reconnection"
    FAILED = "failed"
    EXPIRED = "expired"


OPEN_STATES = frozenset({CommandState.REQUESTED, CommandState.QUEUED, CommandState.SENT})
_ALLOWED = {
    CommandState.REQUESTED: {CommandState.REJECTED, CommandState.QUEUED},
    CommandState.QUEUED: {CommandState.SENT, CommandState.FAILED, CommandState.EXPIRED},
    CommandState.SENT: {
        CommandState.SENT,  # another attempt
        CommandState.CONFIRMED,
        CommandState.CONFIRMED_READY,
        CommandState.FAILED,
        CommandState.EXPIRED,
    },
}


class JournalError(RuntimeError):
    pass


@dataclass(frozen=True)
class Command:
    id: str
    meter: str
    action: RelayAction
    who: str
    why: str
    idempotency_key: str
    override: bool
    state: CommandState
    attempts: int
    created_ns: int
    updated_ns: int
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def is_open(self) -> bool:
        return self.state in OPEN_STATES


@dataclass(frozen=True)
class Event:
    state: CommandState
    at_ns: int
    detail: dict[str, Any]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    meter TEXT NOT NULL,
    action TEXT NOT NULL,
    who TEXT NOT NULL,
    why TEXT NOT NULL,
    idempotency_key TEXT NOT NULL UNIQUE,
    override INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    evidence TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS commands_meter_state ON commands (meter, state);
CREATE TABLE IF NOT EXISTS events (
    command_id TEXT NOT NULL REFERENCES commands (id),
    state TEXT NOT NULL,
    at_ns INTEGER NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_command ON events (command_id);
"""
_EVENT = "INSERT INTO events VALUES (?, ?, ?, ?)"
_COLUMNS = "id, meter, action, who, why, idempotency_key, override, state, attempts, created_ns, updated_ns, evidence"


def _command(row: tuple[Any, ...]) -> Command:
    cid, meter, action, who, why, key, override, state, attempts, created, updated, evidence = row
    return Command(
        cid, meter, RelayAction(action), who, why, key, bool(override), CommandState(state), attempts,
        created, updated, json.loads(evidence),
    )  # fmt: skip


class CommandJournal(DurableStore):
    def __init__(self, path: str | Path) -> None:
        super().__init__(path, _SCHEMA)

    def create(self, meter: str, action: RelayAction, *, who: str, why: str, idempotency_key: str | None = None,
               override: bool = False) -> tuple[Command, bool]:  # fmt: skip
        """Record a new command in `requested`; with a known idempotency key, return that
        command instead. The flag says whether a new one was made."""
        key = idempotency_key or uuid.uuid4().hex
        now = time.time_ns()
        with self._lock, write_transaction(self._db) as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM commands WHERE idempotency_key = ?", (key,)).fetchone()
            if row is not None:
                return _command(row), False
            cid = uuid.uuid4().hex
            db.execute(
                f"INSERT INTO commands ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, '{{}}')",
                (cid, meter, action.value, who, why, key, int(override), CommandState.REQUESTED.value, now, now),
            )
            detail = {"who": who, "why": why, "override": override, "action": action.value}
            db.execute(_EVENT, (cid, CommandState.REQUESTED.value, now, json.dumps(detail)))
        return self.get(cid), True

    def transition(self, command_id: str, state: CommandState, detail: dict[str, Any] | None = None,
                   evidence: dict[str, Any] | None = None, attempt: bool = False) -> Command:  # fmt: skip
        now = time.time_ns()
        with self._lock, write_transaction(self._db) as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM commands WHERE id = ?", (command_id,)).fetchone()
            if row is None:
                raise JournalError(f"no command {command_id}")
            current = _command(row)
            if state not in _ALLOWED.get(current.state, set()):
                raise JournalError(f"command {command_id}: {current.state} -> {state} is not a valid change")
            merged = {**current.evidence, **(evidence or {})}
            db.execute(
                "UPDATE commands SET state = ?, updated_ns = ?, evidence = ?, attempts = attempts + ? WHERE id = ?",
                (state.value, now, json.dumps(merged), int(attempt), command_id),
            )
            db.execute(_EVENT, (command_id, state.value, now, json.dumps(detail or {})))
        return self.get(command_id)

    def get(self, command_id: str) -> Command:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM commands WHERE id = ?", (command_id,)).fetchone()
        if row is None:
            raise JournalError(f"no command {command_id}")
        return _command(row)

    def events(self, command_id: str) -> list[Event]:
        with self._lock:
            rows = self._db.execute(
                "SELECT state, at_ns, detail FROM events WHERE command_id = ? ORDER BY rowid", (command_id,)
            ).fetchall()
        return [Event(CommandState(s), at, json.loads(d)) for s, at, d in rows]

    def find(self, meter: str | None = None, state: CommandState | None = None, limit: int = 1000) -> list[Command]:
        sql, params = f"SELECT {_COLUMNS} FROM commands WHERE 1=1", []
        if meter is not None:
            sql, params = sql + " AND meter = ?", [*params, meter]
        if state is not None:
            sql, params = sql + " AND state = ?", [*params, state.value]
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY created_ns LIMIT ?", (*params, limit)).fetchall()
        return [_command(r) for r in rows]

    def open_for(self, meter: str, *, excluding: str | None = None) -> Command | None:
        placeholders = ", ".join("?" * len(OPEN_STATES))
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM commands WHERE meter = ? AND state IN ({placeholders}) ORDER BY created_ns",
                (meter, *(s.value for s in OPEN_STATES)),
            ).fetchall()
        return next((c for c in map(_command, rows) if c.id != excluding), None)
