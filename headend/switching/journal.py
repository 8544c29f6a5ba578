"""The command journal: every switching command and every change of its state, durably.

SQLite (WAL, synchronous=FULL) behind a small interface so PostgreSQL can take its place. A
state change is committed before the step it announces is taken: `sent` is on disk before
the relay is operated. A command is *claimed* (queued -> running, with an owner token) in
one transaction before any I/O, and every later change made by the runner names that owner:
a command cancelled (by a reconnect) or taken over after a restart cannot be sent by a
runner that no longer holds it.

Idempotency keys are scoped by (principal, meter, action). A key that made a command which
was rejected may be used again (a refusal did nothing, so a retry is decided afresh); any
other command answers every later use of its key, and a different body under the same key
is a conflict.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from headend.model import RelayAction
from headend.storage.sqlite_db import DurableStore, write_transaction


class CommandState(StrEnum):
    REQUESTED = "requested"
    REJECTED = "rejected"
    #: Outside a disconnect window: waits for `not_before` (the next opening).
    DEFERRED = "deferred"
    #: A protected customer under the two-person rule: waits for a second principal.
    AWAITING_APPROVAL = "awaiting_approval"
    QUEUED = "queued"
    #: Claimed by a runner (owner token) and about to talk to the meter; not yet sent.
    RUNNING = "running"
    SENT = "sent"
    CONFIRMED = "confirmed"
    #: A reconnect the meter accepted as ready_for_reconnection: the customer presses the button.
    CONFIRMED_READY = "confirmed_ready_for_reconnection"
    #: A dry run (`switching.dry_run`): every check made and journaled, `sent` included, the
    #: relay never operated; the read-back shows it as it was. Never "confirmed": nothing happened.
    DRY_RUN_OK = "dry_run_ok"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


#: Waiting for something (a window, an approval, a runner, a read-back): a meter has one at most.
OPEN_STATES = frozenset({
    CommandState.REQUESTED, CommandState.DEFERRED, CommandState.AWAITING_APPROVAL, CommandState.QUEUED,
    CommandState.RUNNING, CommandState.SENT,
})  # fmt: skip
#: States in which nothing has been sent yet: a reconnect cancels a disconnect in any of these.
CANCELLABLE = frozenset({
    CommandState.REQUESTED, CommandState.DEFERRED, CommandState.AWAITING_APPROVAL, CommandState.QUEUED,
    CommandState.RUNNING,
})  # fmt: skip
#: Talking to the meter now: no other command of the meter may be claimed meanwhile.
ACTIVE_STATES = frozenset({CommandState.RUNNING, CommandState.SENT})
_DONE = frozenset({CommandState.CONFIRMED, CommandState.CONFIRMED_READY})
# fmt: off
_ALLOWED: dict[CommandState, frozenset[CommandState]] = {
    CommandState.REQUESTED: frozenset({CommandState.REJECTED, CommandState.QUEUED, CommandState.DEFERRED,
                                       CommandState.AWAITING_APPROVAL, CommandState.CANCELLED}),
    CommandState.AWAITING_APPROVAL: frozenset({CommandState.QUEUED, CommandState.DEFERRED, CommandState.REJECTED,
                                               CommandState.CANCELLED, CommandState.EXPIRED}),
    CommandState.DEFERRED: frozenset({CommandState.QUEUED, CommandState.CANCELLED, CommandState.EXPIRED}),
    CommandState.QUEUED: frozenset({CommandState.RUNNING, CommandState.CANCELLED, CommandState.EXPIRED}),
    # A restart hands a command claimed by a dead process back to the queue: `sent` is
    # committed before the relay is operated, so `running` means it never was.
    CommandState.RUNNING: frozenset({CommandState.SENT, CommandState.QUEUED, CommandState.DEFERRED,
                                     CommandState.REJECTED, CommandState.CANCELLED, CommandState.EXPIRED,
                                     CommandState.FAILED, *_DONE}),
    CommandState.SENT: frozenset({CommandState.SENT, CommandState.FAILED, CommandState.DRY_RUN_OK, *_DONE}),
}
# fmt: on


class JournalError(RuntimeError):
    pass


class NotOwner(JournalError):
    """The command changed hands (cancelled, recovered, claimed elsewhere): do not touch the relay."""


class IdempotencyConflict(JournalError):
    def __init__(self, command: Command) -> None:
        super().__init__(f"idempotency key already used for command {command.id} with a different request")
        self.command = command


@dataclass(frozen=True)
class Command:
    id: str
    meter: str
    action: RelayAction
    who: str
    why: str
    idempotency_key: str
    #: The override reason given with the request (None: no override asked for).
    override_reason: str | None
    #: The requester's roles when it asked (what policy is decided on, then and later).
    roles: frozenset[str]
    #: Defer when outside a window (else reject).
    defer: bool
    state: CommandState
    attempts: int
    created_ns: int
    updated_ns: int
    not_before_ns: int | None
    expires_ns: int | None
    owner: str | None
    reason_code: str
    reason: str
    approved_by: str | None
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def is_open(self) -> bool:
        return self.state in OPEN_STATES

    @property
    def override(self) -> bool:
        return self.override_reason is not None


@dataclass(frozen=True)
class Event:
    state: CommandState
    at_ns: int
    detail: dict[str, Any]


@dataclass(frozen=True)
class Admitted:
    """A request as the journal (and then the engine's decision) left it."""

    command: Command
    #: False when an idempotency key answered an earlier command.
    new: bool
    #: Disconnects of the same meter that this reconnect cancelled, in the same transaction.
    cancelled: tuple[Command, ...] = ()


_SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    meter TEXT NOT NULL,
    action TEXT NOT NULL,
    who TEXT NOT NULL,
    why TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    request_hash TEXT NOT NULL DEFAULT '',
    override_reason TEXT,
    roles TEXT NOT NULL DEFAULT '[]',
    defer INTEGER NOT NULL DEFAULT 1,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    not_before_ns INTEGER,
    expires_ns INTEGER,
    owner TEXT,
    reason_code TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    approved_by TEXT,
    evidence TEXT NOT NULL DEFAULT '{}'
);
CREATE UNIQUE INDEX IF NOT EXISTS commands_key ON commands (who, meter, action, idempotency_key)
    WHERE state != 'rejected';
CREATE INDEX IF NOT EXISTS commands_meter_state ON commands (meter, state);
CREATE INDEX IF NOT EXISTS commands_state ON commands (state);
CREATE INDEX IF NOT EXISTS commands_created ON commands (created_ns, id);
CREATE TABLE IF NOT EXISTS events (
    command_id TEXT NOT NULL REFERENCES commands (id),
    state TEXT NOT NULL,
    at_ns INTEGER NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_command ON events (command_id);
"""
# Version 1 (first wave): one global idempotency namespace, no claim, no deferral.
_MIGRATE_FROM_1 = """
ALTER TABLE commands RENAME TO commands_v1;
DROP INDEX IF EXISTS commands_meter_state;
"""
_COPY_FROM_1 = """
INSERT INTO commands (id, meter, action, who, why, idempotency_key, override_reason, roles, state, attempts,
                      created_ns, updated_ns, evidence)
SELECT id, meter, action, who, why, idempotency_key, CASE WHEN override THEN 'override role (journal v1)' END,
       CASE WHEN override THEN '["override"]' ELSE '[]' END, state, attempts, created_ns, updated_ns, evidence
FROM commands_v1;
DROP TABLE commands_v1;
"""
_EVENT = "INSERT INTO events VALUES (?, ?, ?, ?)"
_MAX_NS = 2**63 - 1
_COLUMNS = ("id, meter, action, who, why, idempotency_key, override_reason, roles, defer, state, attempts, "
            "created_ns, updated_ns, not_before_ns, expires_ns, owner, reason_code, reason, approved_by, evidence")


def _command(row: tuple[Any, ...]) -> Command:
    (cid, meter, action, who, why, key, override_reason, roles, defer, state, attempts, created, updated, not_before,
     expires, owner, code, reason, approved_by, evidence) = row  # fmt: skip
    return Command(
        cid, meter, RelayAction(action), who, why, key, override_reason, frozenset(json.loads(roles)), bool(defer),
        CommandState(state), attempts, created, updated, not_before, expires, owner, code, reason, approved_by,
        json.loads(evidence),
    )  # fmt: skip


def request_hash(why: str, override_reason: str | None, defer: bool) -> str:
    """What a retry under the same key must repeat exactly."""
    return hashlib.sha256(json.dumps([why, override_reason, defer]).encode()).hexdigest()


@dataclass(frozen=True)
class Page:
    commands: list[Command]
    #: Pass as `before` to get the next (older) page; None on the last page.
    next_cursor: str | None


class CommandJournal(DurableStore):
    def __init__(self, path: str | Path) -> None:
        super().__init__(path, "")
        self._migrate()

    def _migrate(self) -> None:
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(commands)")}
            if version < _SCHEMA_VERSION and columns and "owner" not in columns:
                self._db.execute("PRAGMA legacy_alter_table = ON")  # keep events pointing at `commands`
                with write_transaction(self._db) as db:
                    for statement in _MIGRATE_FROM_1.split(";"):
                        if statement.strip():
                            db.execute(statement)
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            db.execute(statement)
                    for statement in _COPY_FROM_1.split(";"):
                        if statement.strip():
                            db.execute(statement)
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    # -- requests ------------------------------------------------------------------------

    def create(self, meter: str, action: RelayAction, *, who: str, why: str, idempotency_key: str | None = None,
               override_reason: str | None = None, defer: bool = True, roles: frozenset[str] = frozenset(),
               cancel_reason: str | None = None) -> Admitted:  # fmt: skip
        """Record a new command in `requested`, or answer the command its key already made.

        With `cancel_reason` (a reconnect), open disconnects of the meter that have not been
        sent are cancelled in the same transaction: a payment wins over a queued cut-off."""
        key = idempotency_key or uuid.uuid4().hex
        digest = request_hash(why, override_reason, defer)
        now = time.time_ns()
        with self._lock, write_transaction(self._db) as db:
            row = db.execute(
                f"SELECT {_COLUMNS}, request_hash FROM commands WHERE who = ? AND meter = ? AND action = ? "
                "AND idempotency_key = ? AND state != 'rejected'", (who, meter, action.value, key),
            ).fetchone()  # fmt: skip
            if row is not None:
                existing = _command(row[:-1])
                if row[-1] and row[-1] != digest:
                    raise IdempotencyConflict(existing)
                return Admitted(existing, False)
            cid = uuid.uuid4().hex
            db.execute(
                "INSERT INTO commands (id, meter, action, who, why, idempotency_key, request_hash, override_reason, "
                "roles, defer, state, created_ns, updated_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (cid, meter, action.value, who, why, key, digest, override_reason, json.dumps(sorted(roles)),
                 int(defer), CommandState.REQUESTED.value, now, now),
            )  # fmt: skip
            detail = {"who": who, "why": why, "override": override_reason, "action": action.value,
                      "idempotency_key": key}  # fmt: skip
            db.execute(_EVENT, (cid, CommandState.REQUESTED.value, now, json.dumps(detail)))
            cancelled = []
            if cancel_reason is not None:
                placeholders = ", ".join("?" * len(CANCELLABLE))
                rows = db.execute(
                    f"SELECT {_COLUMNS} FROM commands WHERE meter = ? AND action = ? AND state IN ({placeholders})",
                    (meter, RelayAction.DISCONNECT.value, *(s.value for s in CANCELLABLE)),
                ).fetchall()
                for other in map(_command, rows):
                    reason = f"{cancel_reason} (command {cid})"
                    self._change(db, other, CommandState.CANCELLED, now, {"reason": reason, "code": "reconnect"},
                                 code="reconnect", reason=reason)  # fmt: skip
                    cancelled.append(other.id)
        return Admitted(self.get(cid), True, tuple(self.get(c) for c in cancelled))

    # -- state changes -------------------------------------------------------------------

    def transition(self, command_id: str, state: CommandState, detail: dict[str, Any] | None = None,
                   evidence: dict[str, Any] | None = None, *, attempt: bool = False, owner: str | None = None,
                   code: str | None = None, reason: str | None = None, not_before_ns: int | None = None,
                   expires_ns: int | None = None, approved_by: str | None = None) -> Command:  # fmt: skip
        """Change a command's state. With `owner`, only while that owner holds it (else
        NotOwner); `code`/`reason` explain a refusal, cancellation or failure."""
        now = time.time_ns()
        with self._lock, write_transaction(self._db) as db:
            current = self._row(db, command_id)
            if owner is not None and (current.owner != owner or current.state not in ACTIVE_STATES):
                raise NotOwner(f"command {command_id} is {current.state}, no longer held by this runner")
            if state not in _ALLOWED.get(current.state, frozenset()):
                raise JournalError(f"command {command_id}: {current.state} -> {state} is not a valid change")
            details = {**(detail or {}), **({"code": code} if code else {})}
            self._change(db, current, state, now, details, evidence=evidence, attempt=attempt, code=code,
                         reason=reason, not_before_ns=not_before_ns, expires_ns=expires_ns,
                         approved_by=approved_by)  # fmt: skip
        return self.get(command_id)

    def _change(self, db: Any, current: Command, state: CommandState, now: int, detail: dict[str, Any], *,
                evidence: dict[str, Any] | None = None, attempt: bool = False, code: str | None = None,
                reason: str | None = None, not_before_ns: int | None = None, expires_ns: int | None = None,
                approved_by: str | None = None) -> None:  # fmt: skip
        merged = {**current.evidence, **(evidence or {})}
        keep_owner = state in ACTIVE_STATES  # the claim ends with the command's turn on the meter
        db.execute(
            "UPDATE commands SET state = ?, updated_ns = ?, evidence = ?, attempts = attempts + ?, "
            "reason_code = COALESCE(?, reason_code), reason = COALESCE(?, reason), "
            "not_before_ns = COALESCE(?, not_before_ns), expires_ns = COALESCE(?, expires_ns), "
            "approved_by = COALESCE(?, approved_by), owner = CASE WHEN ? THEN owner ELSE NULL END WHERE id = ?",
            (state.value, now, json.dumps(merged), int(attempt), code, reason, not_before_ns, expires_ns,
             approved_by, int(keep_owner), current.id),
        )  # fmt: skip
        db.execute(_EVENT, (current.id, state.value, now, json.dumps(detail)))

    def claim(self, command_id: str, owner: str) -> Command | None:
        """queued -> running for `owner`, if the command is queued and no other command of its
        meter is running or sent. None when it cannot be claimed now (see `get` for why)."""
        now = time.time_ns()
        active = ", ".join("?" * len(ACTIVE_STATES))
        with self._lock, write_transaction(self._db) as db:
            current = self._row(db, command_id)
            if current.state != CommandState.QUEUED:
                return None
            busy = db.execute(
                f"SELECT 1 FROM commands WHERE meter = ? AND id != ? AND state IN ({active}) LIMIT 1",
                (current.meter, command_id, *(s.value for s in ACTIVE_STATES)),
            ).fetchone()
            if busy is not None:
                return None
            db.execute("UPDATE commands SET state = ?, owner = ?, updated_ns = ? WHERE id = ?",
                       (CommandState.RUNNING.value, owner, now, command_id))  # fmt: skip
            db.execute(_EVENT, (command_id, CommandState.RUNNING.value, now, json.dumps({"owner": owner})))
        return self.get(command_id)

    def release(self, command_id: str, owner: str, detail: dict[str, Any]) -> Command:
        """running -> queued: a claimed command handed back before anything was sent."""
        return self.transition(command_id, CommandState.QUEUED, detail, owner=owner)

    # -- reading -------------------------------------------------------------------------

    def _row(self, db: Any, command_id: str) -> Command:
        row = db.execute(f"SELECT {_COLUMNS} FROM commands WHERE id = ?", (command_id,)).fetchone()
        if row is None:
            raise JournalError(f"no command {command_id}")
        return _command(row)

    def get(self, command_id: str) -> Command:
        with self._lock:
            return self._row(self._db, command_id)

    def events(self, command_id: str) -> list[Event]:
        with self._lock:
            rows = self._db.execute(
                "SELECT state, at_ns, detail FROM events WHERE command_id = ? ORDER BY rowid", (command_id,)
            ).fetchall()
        return [Event(CommandState(s), at, json.loads(d)) for s, at, d in rows]

    def find(self, meter: str | None = None, state: CommandState | None = None, limit: int = 1000) -> list[Command]:
        """Oldest first (the order work is resumed in after a restart)."""
        sql, params = f"SELECT {_COLUMNS} FROM commands WHERE 1=1", []
        if meter is not None:
            sql, params = sql + " AND meter = ?", [*params, meter]
        if state is not None:
            sql, params = sql + " AND state = ?", [*params, state.value]
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY created_ns, id LIMIT ?", (*params, limit)).fetchall()
        return [_command(r) for r in rows]

    def page(self, *, meter: str | None = None, states: Iterable[CommandState] = (), since_ns: int | None = None,
             who: str | None = None, before: str | None = None, limit: int = 100) -> Page:  # fmt: skip
        """Newest first, `limit` at a time; `before` is the cursor of the previous page."""
        sql, params = f"SELECT {_COLUMNS} FROM commands WHERE 1=1", []
        wanted = [s.value for s in states]
        since_ns = None if since_ns is None else max(min(since_ns, _MAX_NS), -_MAX_NS)  # SQLite's INTEGER
        for clause, value in (("meter = ?", meter), ("created_ns >= ?", since_ns), ("who = ?", who)):
            if value is not None:
                sql, params = f"{sql} AND {clause}", [*params, value]
        if wanted:
            sql, params = f"{sql} AND state IN ({', '.join('?' * len(wanted))})", [*params, *wanted]
        if before is not None:
            created, _, cid = before.partition(":")
            at = min(int(created), _MAX_NS)
            sql = f"{sql} AND (created_ns < ? OR (created_ns = ? AND id < ?))"
            params = [*params, at, at, cid]
        with self._lock:
            rows = self._db.execute(f"{sql} ORDER BY created_ns DESC, id DESC LIMIT ?", (*params, limit + 1))
            rows = rows.fetchall()
        commands = [_command(r) for r in rows[:limit]]
        more = len(rows) > limit
        return Page(commands, f"{commands[-1].created_ns}:{commands[-1].id}" if more else None)

    def open_for(self, meter: str, *, excluding: str | None = None) -> Command | None:
        placeholders = ", ".join("?" * len(OPEN_STATES))
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM commands WHERE meter = ? AND state IN ({placeholders}) ORDER BY created_ns",
                (meter, *(s.value for s in OPEN_STATES)),
            ).fetchall()
        return next((c for c in map(_command, rows) if c.id != excluding), None)

    def counts(self) -> dict[tuple[str, str], int]:
        """Commands by (action, state), for the metrics."""
        with self._lock:
            rows = self._db.execute("SELECT action, state, count(*) FROM commands GROUP BY action, state").fetchall()
        return {(a, s): n for a, s, n in rows}
