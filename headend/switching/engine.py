"""The closed switching loop: policy, then send, then read the relay back until it matches.

requested -> rejected (policy, or another open command for the meter) | queued -> sent ->
confirmed | confirmed_ready_for_reconnection | failed | expired. Each change is committed
to the journal before the step it announces. A reconnect that leaves the relay
ready_for_reconnection (DLMS control modes 1, 3, 5) is its own confirmed state. After a
restart, commands found in `sent` are confirmed by reading the relay, never sent again.
Evidence kept with each command: the relay before and after, and the import energy register
at the moment of switching.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from headend.model import IMPORT_ENERGY, RelayAction, RelayState
from headend.protocols.base import MeterError, MeterSession
from headend.registry import Registry
from headend.switching.journal import Command, CommandJournal, CommandState
from headend.switching.policy import OVERRIDE_ROLE, SwitchingPolicy

log = logging.getLogger(__name__)

SessionFactory = Callable[[str], MeterSession]
_TARGETS = {
    RelayAction.DISCONNECT: {RelayState.DISCONNECTED},
    RelayAction.RECONNECT: {RelayState.CONNECTED, RelayState.READY_FOR_RECONNECTION},
}


class SwitchingEngine:
    def __init__(
        self,
        journal: CommandJournal,
        policy: SwitchingPolicy,
        registry: Registry,
        sessions: SessionFactory,
        *,
        confirm_timeout: float = 60.0,
        poll_interval: float = 2.0,
        attempts: int = 3,
        dry_run: bool = False,
        deadline: float = 3600.0,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self.journal = journal
        self.policy = policy
        self.registry = registry
        self.sessions = sessions
        self.confirm_timeout = confirm_timeout
        self.poll_interval = poll_interval
        self.attempts = attempts
        self.dry_run = dry_run
        self.deadline = deadline
        self.now = now or (lambda: datetime.now(UTC))

    # -- requests ----------------------------------------------------------------------

    def request(self, meter_id: str, action: RelayAction, *, who: str, why: str, roles: frozenset[str] = frozenset(),
                idempotency_key: str | None = None) -> Command:  # fmt: skip
        """Journal a request and decide on it: `queued` or `rejected` with the reason."""
        meter = self.registry.meter(meter_id)
        override = OVERRIDE_ROLE in roles
        command, new = self.journal.create(
            meter_id, action, who=who, why=why, idempotency_key=idempotency_key, override=override
        )
        if not new:
            return command
        other = self.journal.open_for(meter_id, excluding=command.id)
        if other is not None:
            reason = f"meter {meter_id} has an open command {other.id} ({other.state}, {other.action})"
            return self.journal.transition(command.id, CommandState.REJECTED, {"reason": reason})
        decision = self.policy.decide(meter, action, self.now(), roles)
        detail = {"reason": decision.reason, "who": who, "roles": sorted(roles)}
        if not decision.allowed:
            log.info("command %s for %s rejected: %s", command.id, meter_id, decision.reason)
            return self.journal.transition(command.id, CommandState.REJECTED, detail)
        return self.journal.transition(command.id, CommandState.QUEUED, detail)

    async def execute(self, meter_id: str, action: RelayAction, **kwargs: Any) -> Command:
        command = self.request(meter_id, action, **kwargs)
        if command.state == CommandState.QUEUED:
            return await self.run(command.id)
        return command

    # -- the loop ----------------------------------------------------------------------

    async def run(self, command_id: str) -> Command:
        command = self.journal.get(command_id)
        if command.state != CommandState.QUEUED:
            return command
        waited = (time.time_ns() - command.created_ns) / 1e9
        if waited > self.deadline:
            # A disconnect hours late may hit a customer who has paid since: let it lapse.
            reason = f"waited {waited:.0f}s in the queue, past the {self.deadline:g}s deadline; not sent"
            return self.journal.transition(command.id, CommandState.EXPIRED, {"reason": reason})
        targets = _TARGETS[command.action]
        last_error = ""
        for attempt in range(1, self.attempts + 1):
            try:
                async with self.sessions(command.meter) as session:
                    before = await session.read_relay()
                    register = await _register(session)
                    evidence = {"relay_before": before.value, "register_at_switching": register}
                    command = self.journal.transition(
                        command.id, CommandState.SENT, {"attempt": attempt, "dry_run": self.dry_run},
                        evidence, attempt=True,
                    )  # fmt: skip
                    if before not in targets and not self.dry_run:
                        await session.operate_relay(command.action)
                    state = await self._read_back(session, targets)
                    if state in targets or self.dry_run:
                        return self._confirmed(command, state, await _register(session))
                    last_error = f"relay still {state.value} {self.confirm_timeout:g}s after the command"
            except MeterError as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                if not exc.retryable:
                    break
            log.warning("command %s for %s, attempt %d: %s", command.id, command.meter, attempt, last_error)
        return self._fail(command, last_error)

    async def _read_back(self, session: MeterSession, targets: set[RelayState]) -> RelayState:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.confirm_timeout
        while True:
            state = await session.read_relay()
            if state in targets or loop.time() >= deadline:
                return state
            await asyncio.sleep(self.poll_interval)  # the relay needs time to move; we poll the meter

    def _confirmed(self, command: Command, state: RelayState, register: Any) -> Command:
        final = CommandState.CONFIRMED_READY if state == RelayState.READY_FOR_RECONNECTION else CommandState.CONFIRMED
        evidence = {"relay_after": state.value, "register_after": register, "confirmed_at": self.now().isoformat()}
        log.info("command %s: %s %s confirmed (%s)", command.id, command.meter, command.action, state.value)
        return self.journal.transition(command.id, final, {"relay": state.value}, evidence)

    def _fail(self, command: Command, reason: str) -> Command:
        log.warning("command %s for %s failed: %s", command.id, command.meter, reason)
        return self.journal.transition(command.id, CommandState.FAILED, {"reason": reason}, {"error": reason})

    # -- after a restart ------------------------------------------------------------------

    async def recover(self) -> list[Command]:
        """Confirm commands left in `sent` by reading the relay (never resend); run queued ones."""
        done = []
        for command in self.journal.find(state=CommandState.SENT):
            targets = _TARGETS[command.action]
            try:
                async with self.sessions(command.meter) as session:
                    state = await session.read_relay()
                    if state in targets:
                        done.append(self._confirmed(command, state, await _register(session)))
                        continue
                    reason = f"after a restart the relay reads {state.value}; not sent again"
            except MeterError as exc:
                reason = f"after a restart the relay could not be read ({exc}); not sent again"
            done.append(self.journal.transition(command.id, CommandState.FAILED, {"reason": reason}, {"error": reason}))
        for command in self.journal.find(state=CommandState.QUEUED):
            done.append(await self.run(command.id))
        return done


async def _register(session: MeterSession) -> float | str | None:
    try:
        (reading,) = await session.read_registers([IMPORT_ENERGY])
    except MeterError as exc:
        return f"unavailable: {exc}"
    return reading.value
