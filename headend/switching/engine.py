"""The closed switching loop: admission, claim, policy again, send, read the relay back.

requested -> rejected | deferred | awaiting_approval | queued; queued -> running (claimed by
one runner, owner token) -> sent -> confirmed | confirmed_ready_for_reconnection | failed;
expired and cancelled on the way. Each change is committed to the journal before the step
it announces. A relay already at the target is confirmed by read-back without operating it.
A reconnect cancels the meter's disconnects that were not sent yet. After a restart,
commands found in `sent` are confirmed by reading the relay, never sent again; a read-back
that cannot reach the meter yet leaves them `sent` to be tried again, never `failed`.
Evidence kept with each command: the relay before and after, and the import energy register
at the moment of switching.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar

from headend.model import IMPORT_ENERGY, RelayAction, RelayState
from headend.protocols.base import MeterError, MeterSession
from headend.registry import Registry
from headend.scheduler.admission import LinkAdmission
from headend.scheduler.gate import Lane
from headend.switching.journal import Admitted, Command, CommandJournal, CommandState, NotOwner
from headend.switching.policy import OVERRIDE_ROLE, Decision, Refusal, SwitchingPolicy

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

#: Principal prefix of commissioning relay tests (headend commission --test-relay).
COMMISSIONING = "commissioning:"
_TARGETS = {
    RelayAction.DISCONNECT: {RelayState.DISCONNECTED},
    RelayAction.RECONNECT: {RelayState.CONNECTED, RelayState.READY_FOR_RECONNECTION},
}


class ApprovalError(RuntimeError):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _ns(t: datetime) -> int:
    return int(t.timestamp() * 1e9)


class SwitchingEngine:
    def __init__(
        self,
        journal: CommandJournal,
        policy: SwitchingPolicy,
        registry: Registry,
        sessions: Callable[[str], MeterSession] | None = None,
        *,
        admission: LinkAdmission | None = None,
        confirm_timeout: float = 60.0,
        poll_interval: float = 2.0,
        attempts: int = 3,
        dry_run: bool = False,
        deadline: float = 3600.0,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        if admission is None:
            if sessions is None:
                raise ValueError("give the engine a LinkAdmission or a session factory")
            admission = LinkAdmission(registry, sessions)
        self.journal = journal
        self.policy = policy
        self.registry = registry
        self.admission = admission
        self.confirm_timeout = confirm_timeout
        self.poll_interval = poll_interval
        self.attempts = attempts
        self.dry_run = dry_run
        self.deadline = deadline
        self.now = now or (lambda: datetime.now(UTC))
        #: Seconds from request to confirmation, for each confirmed command (metrics; called
        #: from the journal thread).
        self.on_confirmed: Callable[[Command, float], None] | None = None
        self._journal_thread = ThreadPoolExecutor(1, thread_name_prefix="switching-journal")

    async def off_loop(self, step: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a journaling step (each change is an fsynced transaction, milliseconds) in the
        engine's one journal thread. One thread, so steps run one at a time in the order they
        were asked for, as they did on the event loop; but the loop serves meters and API
        calls meanwhile (a bulk of 1,000 admissions held it for 0.8 s)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._journal_thread, functools.partial(step, *args, **kwargs))

    def close(self) -> None:
        """Wait for journaling steps under way (each is short); the journal stays open."""
        self._journal_thread.shutdown(wait=True)

    # -- requests ----------------------------------------------------------------------

    def request(self, meter_id: str, action: RelayAction, *, who: str, why: str, roles: frozenset[str] = frozenset(),
                idempotency_key: str | None = None, override_reason: str | None = None,
                defer: bool = True) -> Admitted:  # fmt: skip
        """Journal a request and decide on it. A reconnect first cancels the meter's disconnects
        that have not been sent (same transaction)."""
        meter = self.registry.meter(meter_id)  # UnknownMeter before anything is journaled
        cancel = f"cancelled by a reconnect from {who}: {why}" if action == RelayAction.RECONNECT else None
        created = self.journal.create(meter.id, action, who=who, why=why, idempotency_key=idempotency_key,
                                      override_reason=override_reason, defer=defer, roles=roles,
                                      cancel_reason=cancel)  # fmt: skip
        for gone in created.cancelled:
            log.info("command %s (%s %s) cancelled by reconnect %s", gone.id, gone.action, gone.meter,
                     created.command.id)  # fmt: skip
        if not created.new:
            return created
        return dataclasses.replace(created, command=self.decide(created.command))

    def decide(self, command: Command) -> Command:
        """requested -> rejected | deferred | awaiting_approval | queued, on the roles the
        requester held when it asked."""
        roles = command.roles
        other = self.journal.open_for(command.meter, excluding=command.id)
        if other is not None and not (command.action == RelayAction.RECONNECT and other.state == CommandState.SENT):
            # A reconnect may follow a disconnect already sent: it runs once that one is done.
            reason = f"meter {command.meter} has an open command {other.id} ({other.state}, {other.action})"
            return self._refuse(command, Decision(False, reason, Refusal.OPEN_COMMAND))
        meter = self.registry.meter(command.meter)
        decision = self.policy.decide(meter, command.action, self.now(), roles, command.override_reason)
        detail = {"reason": decision.reason, "roles": sorted(roles)}
        waits_for_window = not decision.allowed and decision.not_before is not None
        if self._needs_approval(command) and (decision.allowed or waits_for_window):
            # The second person first: a window opening later must not stand in for the approval.
            # Unapproved for `max_defer`, it expires rather than run on a stale request.
            return self.journal.transition(
                command.id, CommandState.AWAITING_APPROVAL, detail, code="approval",
                reason="protected customer: waits for a second principal with the override role to approve",
                expires_ns=_ns(self.now() + self.policy.config.max_defer),
            )  # fmt: skip
        if waits_for_window and command.defer:
            return self._defer(command, decision, detail)
        if not decision.allowed:
            return self._refuse(command, decision)
        return self.journal.transition(command.id, CommandState.QUEUED, detail, reason=decision.reason,
                                       expires_ns=self._expiry(command))  # fmt: skip

    def _expiry(self, command: Command) -> int | None:
        """A disconnect hours late may hit a customer who has paid since: it expires. A
        reconnect never does: late is still better than a paying customer left dark."""
        if command.action == RelayAction.RECONNECT:
            return None
        return _ns(self.now()) + int(self.deadline * 1e9)

    def _needs_approval(self, command: Command) -> bool:
        meter = self.registry.meter(command.meter)
        return (meter.protected and command.action == RelayAction.DISCONNECT
                and self.policy.config.protected_approval)  # fmt: skip

    def approve(self, command_id: str, who: str, roles: frozenset[str]) -> Command:
        """The second person of the two-person rule: another principal with the override role."""
        command = self.journal.get(command_id)
        if command.state != CommandState.AWAITING_APPROVAL:
            raise ApprovalError(409, f"command {command_id} is {command.state}, not awaiting approval")
        if OVERRIDE_ROLE not in roles:
            raise ApprovalError(403, "approving needs the override role")
        if who == command.who:
            raise ApprovalError(403, f"{who} requested this command; a different principal must approve it")
        if command.expires_ns is not None and _ns(self.now()) >= command.expires_ns:
            self._expire(command)
            raise ApprovalError(409, f"command {command_id} waited too long for approval and expired")
        decision = self.policy.decide(self.registry.meter(command.meter), command.action, self.now(),
                                      frozenset({OVERRIDE_ROLE}), command.override_reason)  # fmt: skip
        detail = {"approved_by": who, "reason": decision.reason}
        if not decision.allowed and decision.not_before is not None and command.defer:
            return self._defer(command, decision, detail, approved_by=who)
        if not decision.allowed:
            return self._refuse(command, decision, approved_by=who)
        return self.journal.transition(command.id, CommandState.QUEUED, detail, approved_by=who,
                                       expires_ns=self._expiry(command))  # fmt: skip

    def _defer(self, command: Command, decision: Decision, detail: dict[str, Any], *, owner: str | None = None,
               approved_by: str | None = None) -> Command:  # fmt: skip
        assert decision.not_before is not None
        not_before = _ns(decision.not_before)
        log.info("command %s for %s deferred: %s", command.id, command.meter, decision.reason)
        return self.journal.transition(
            command.id, CommandState.DEFERRED, {**detail, "not_before": decision.not_before.isoformat()},
            owner=owner, code=decision.code, reason=decision.reason, not_before_ns=not_before,
            expires_ns=not_before + int(self.deadline * 1e9), approved_by=approved_by,
        )  # fmt: skip

    def _refuse(self, command: Command, decision: Decision, *, owner: str | None = None,
                approved_by: str | None = None) -> Command:  # fmt: skip
        log.info("command %s for %s rejected: %s", command.id, command.meter, decision.reason)
        return self.journal.transition(command.id, CommandState.REJECTED, {"reason": decision.reason}, owner=owner,
                                       code=decision.code, reason=decision.reason, approved_by=approved_by)  # fmt: skip

    def release_waiting(self, command_id: str) -> Command:
        """When its time comes: deferred -> queued (its window opened) or expired (past its
        deadline); awaiting_approval -> expired (past its deadline)."""
        command = self.journal.get(command_id)
        late = command.expires_ns is not None and _ns(self.now()) >= command.expires_ns
        if command.state == CommandState.DEFERRED:
            if late:
                return self._expire(command)
            return self.journal.transition(command.id, CommandState.QUEUED, {"reason": "the disconnect window opened"})
        if command.state == CommandState.AWAITING_APPROVAL and late:
            return self._expire(command)
        return command

    def _expire(self, command: Command, owner: str | None = None) -> Command:
        reason = "not run before its deadline; a disconnect hours late may hit a customer who has paid since"
        return self.journal.transition(command.id, CommandState.EXPIRED, {"reason": reason}, owner=owner,
                                       code=Refusal.EXPIRED, reason=reason)  # fmt: skip

    async def execute(self, meter_id: str, action: RelayAction, **kwargs: Any) -> Command:
        """Request and run at once (tests, tools): the runner's path without its queue."""
        command = (await self.off_loop(self.request, meter_id, action, **kwargs)).command
        if command.state == CommandState.QUEUED:
            return await self.run(command.id)
        return command

    # -- the loop ----------------------------------------------------------------------

    async def run(self, command_id: str, owner: str | None = None) -> Command:
        """Claim a queued command and carry it out. A command that cannot be claimed (not
        queued, or its meter busy with another) is returned as it is."""
        owner = owner or f"runner-{id(self):x}-{time.monotonic_ns()}"
        claimed, command = await self.off_loop(self._claim, command_id, owner)
        if claimed is None:
            return command
        try:
            return await self._carry_out(claimed, owner)
        except NotOwner as exc:
            # Cancelled by a reconnect (or taken over) before anything was sent.
            log.info("command %s: %s; the relay was not operated", command_id, exc)
            return await self.off_loop(self.journal.get, command_id)

    def _claim(self, command_id: str, owner: str) -> tuple[Command | None, Command]:
        """The claim, or the command as it is when it cannot be claimed: one journal step, so
        the runner sees the state that refused the claim (the meter's other command still
        running), not one a later step made (it finished: then nobody would wake this one)."""
        claimed = self.journal.claim(command_id, owner)
        return claimed, claimed if claimed is not None else self.journal.get(command_id)

    async def _carry_out(self, command: Command, owner: str) -> Command:
        if command.expires_ns is not None and _ns(self.now()) >= command.expires_ns:
            return await self.off_loop(self._expire, command, owner)
        targets = _TARGETS[command.action]
        last_error = ""
        for attempt in range(1, self.attempts + 1):
            try:
                async with self.admission.session(command.meter, Lane.SWITCHING) as session:
                    before = await session.read_relay()
                    register = await _register(session)
                    command, send = await _finished_even_if_cancelled(
                        self._send(session, command, before, register, owner, attempt))
                    if not send:
                        return command
                    if self.dry_run:
                        state = await session.read_relay()
                        return await self.off_loop(self._dry_run_done, command, state, await _register(session),
                                                   owner)  # fmt: skip
                    state = await self._read_back(session, targets)
                    if state in targets:
                        return await self.off_loop(self._confirmed, command, state, await _register(session), owner)
                    last_error = f"relay still {state.value} {self.confirm_timeout:g}s after the command"
            except MeterError as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                if not exc.retryable:
                    break
            log.warning("command %s for %s, attempt %d: %s", command.id, command.meter, attempt, last_error)
        return await self.off_loop(self._fail, command, last_error, owner)

    async def _send(self, session: MeterSession, command: Command, before: RelayState, register: Any, owner: str,
                    attempt: int) -> tuple[Command, bool]:  # fmt: skip
        """`_go_ahead`, then the relay operated if it said so: once `sent` is journaled the
        command is operated, so that a restart's read-back judges what really happened."""
        command, send = await self.off_loop(self._go_ahead, command, before, register, owner, attempt)
        if send and not self.dry_run:
            await session.operate_relay(command.action)
        return command, send

    def _go_ahead(self, command: Command, before: RelayState, register: Any, owner: str,
                  attempt: int) -> tuple[Command, bool]:  # fmt: skip
        """Policy again, now that the link is ours (windows close, registries change, a payment
        may have come in), and `sent` journaled: (command, True) to operate the relay, or the
        command as it ended, False. One journal step: a reconnect admitted between the check
        and `sent` would find this disconnect already past cancelling and not stop it."""
        decision = self._recheck(command)
        if not decision.allowed:
            return self._refused_at_run(command, decision, owner), False
        evidence = {"relay_before": before.value, "register_at_switching": register}
        if before in _TARGETS[command.action]:
            log.info("command %s: %s relay already %s; not operated", command.id, command.meter, before.value)
            return self._confirmed(command, before, register, owner, operated=False, evidence=evidence), False
        sent = self.journal.transition(command.id, CommandState.SENT, {"attempt": attempt, "dry_run": self.dry_run},
                                       evidence, attempt=True, owner=owner)  # fmt: skip
        return sent, True

    def _recheck(self, command: Command) -> Decision:
        if self._needs_approval(command) and command.approved_by is None:
            return Decision(False, "protected customer: not approved by a second principal", "approval")
        if command.action == RelayAction.DISCONNECT:
            waiting = self.journal.open_for(command.meter, excluding=command.id)
            if waiting is not None and waiting.action == RelayAction.RECONNECT:
                # A payment arrived while this disconnect was sent: no further attempt.
                return Decision(False, f"reconnect {waiting.id} of this meter is waiting", "reconnect")
        return self.policy.decide(self.registry.meter(command.meter), command.action, self.now(), command.roles,
                                  command.override_reason)  # fmt: skip

    def _refused_at_run(self, command: Command, decision: Decision, owner: str) -> Command:
        if command.state == CommandState.SENT:
            # Sent once already and the retry is no longer allowed: stop here.
            return self._fail(command, f"not retried: {decision.reason}", owner)
        detail = {"reason": decision.reason, "at": "before operating the relay"}
        if decision.not_before is not None and command.defer:
            return self._defer(command, decision, detail, owner=owner)
        return self._refuse(command, decision, owner=owner)

    async def _read_back(self, session: MeterSession, targets: set[RelayState]) -> RelayState:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.confirm_timeout
        while True:
            state = await session.read_relay()
            if state in targets or loop.time() >= deadline:
                return state
            await asyncio.sleep(self.poll_interval)  # the relay needs time to move; we poll the meter

    async def _send_again(self, session: MeterSession, command: Command) -> None:
        await self.off_loop(self.journal.transition, command.id, CommandState.SENT, {"attempt": "after a restart"},
                            attempt=True, owner=command.owner)  # fmt: skip
        await session.operate_relay(command.action)

    def _dry_run_done(self, command: Command, state: RelayState, register: Any, owner: str | None) -> Command:
        """A dry run's end: the relay as read now (never operated), and no confirmation."""
        evidence = {"relay_after": state.value, "register_after": register, "checked_at": self.now().isoformat(),
                    "operated": False}  # fmt: skip
        log.info("command %s: %s %s dry run done; relay %s, not operated", command.id, command.meter,
                 command.action, state.value)  # fmt: skip
        return self.journal.transition(command.id, CommandState.DRY_RUN_OK, {"relay": state.value, "operated": False},
                                       evidence, owner=owner)  # fmt: skip

    def _confirmed(self, command: Command, state: RelayState, register: Any, owner: str | None, *,
                   operated: bool = True, evidence: dict[str, Any] | None = None) -> Command:  # fmt: skip
        final = CommandState.CONFIRMED_READY if state == RelayState.READY_FOR_RECONNECTION else CommandState.CONFIRMED
        evidence = {**(evidence or {}), "relay_after": state.value, "register_after": register,
                    "confirmed_at": self.now().isoformat(), "operated": operated}  # fmt: skip
        log.info("command %s: %s %s confirmed (%s)", command.id, command.meter, command.action, state.value)
        done = self.journal.transition(command.id, final, {"relay": state.value, "operated": evidence["operated"]},
                                       evidence, owner=owner)  # fmt: skip
        if self.on_confirmed is not None:
            self.on_confirmed(done, (done.updated_ns - done.created_ns) / 1e9)
        return done

    def _fail(self, command: Command, reason: str, owner: str | None) -> Command:
        log.warning("command %s for %s failed: %s", command.id, command.meter, reason)
        return self.journal.transition(command.id, CommandState.FAILED, {"reason": reason}, {"error": reason},
                                       owner=owner, code="failed", reason=reason)  # fmt: skip

    # -- after a restart ------------------------------------------------------------------

    def recover(self) -> list[Command]:
        """What a restart finds in the journal, made ready for the runner (no I/O here):
        commands of meters no longer in the registry end (cancelled; `failed` if already
        sent: nobody can read that relay back now); requested ones are decided; ones claimed
        by the dead process go back to the queue (`sent` is journaled before the relay is
        operated, so `running` was never sent). Returns every open command, for the runner."""
        for state in (CommandState.REQUESTED, CommandState.AWAITING_APPROVAL, CommandState.DEFERRED,
                      CommandState.QUEUED, CommandState.RUNNING, CommandState.SENT):  # fmt: skip
            for command in self.journal.find(state=state, limit=1_000_000):
                if not self.registry.has(command.meter):
                    reason = f"meter {command.meter} is no longer in the registry"
                    if state == CommandState.SENT:
                        self._fail(command, f"{reason}; its relay cannot be read back", command.owner)
                    else:
                        self._cancel_at_restart(command, "unknown_meter", reason)
                elif command.who.startswith(COMMISSIONING) and state != CommandState.SENT:
                    # A commissioning relay test runs in its own process and puts the relay back
                    # itself: a live test would lose its claim, a dead one would leave a customer
                    # switched by a test nobody finishes.
                    self._cancel_at_restart(command, "commissioning",
                                            "a commissioning relay test's command: not taken over by the server")
        for command in self.journal.find(state=CommandState.REQUESTED, limit=1_000_000):
            self.decide(command)
        for command in self.journal.find(state=CommandState.RUNNING, limit=1_000_000):
            self.journal.release(command.id, command.owner or "",
                                 {"reason": "claimed by a process that stopped before sending; queued again"})
        waiting = (CommandState.SENT, CommandState.QUEUED, CommandState.DEFERRED, CommandState.AWAITING_APPROVAL)
        return [c for state in waiting for c in self.journal.find(state=state, limit=1_000_000)]

    def _cancel_at_restart(self, command: Command, code: str, reason: str) -> None:
        """End a command a restart finds but must not carry out (nothing was sent)."""
        log.warning("command %s (%s %s) cancelled: %s", command.id, command.action, command.meter, reason)
        self.journal.transition(command.id, CommandState.CANCELLED, {"reason": reason}, code=code, reason=reason)

    async def reconfirm(self, command: Command) -> Command | None:
        """A `sent` command whose outcome a restart lost: read the relay. A disconnect is never
        sent again; a reconnect the relay shows did not happen is. None when the meter cannot
        be reached yet: it stays `sent`, to be tried again."""
        targets = _TARGETS[command.action]
        try:
            async with self.admission.session(command.meter, Lane.SWITCHING) as session:
                state = await session.read_relay()
                if state in targets:
                    return await self.off_loop(self._confirmed, command, state, await _register(session),
                                               command.owner)  # fmt: skip
                if self.dry_run:
                    return await self.off_loop(self._dry_run_done, command, state, await _register(session),
                                               command.owner)  # fmt: skip
                if command.action == RelayAction.RECONNECT:
                    # Unlike a disconnect, a reconnect is safe to send again: the customer paid.
                    await _finished_even_if_cancelled(self._send_again(session, command))
                    state = await self._read_back(session, targets)
                    if state in targets:
                        return await self.off_loop(self._confirmed, command, state, await _register(session),
                                                   command.owner)  # fmt: skip
        except MeterError as exc:
            if exc.retryable:
                log.info("command %s: relay of %s not readable yet (%s); will try again", command.id,
                         command.meter, exc)  # fmt: skip
                return None
            reason = f"after a restart the relay could not be read ({exc}); not sent again"
            return await self.off_loop(self._fail, command, reason, command.owner)
        reason = f"after a restart the relay reads {state.value}; not sent again"
        return await self.off_loop(self._fail, command, reason, command.owner)


async def _finished_even_if_cancelled(step: Coroutine[Any, Any, T]) -> T:
    """Run `step` to its end even when the caller is cancelled (a stopping runner), then pass
    the cancellation on. For `sent` and the relay operation: journaled `sent` and never
    operated, a restart would fail a command the relay never saw."""
    task = asyncio.ensure_future(step)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task
        raise


async def _register(session: MeterSession) -> float | str | None:
    try:
        (reading,) = await session.read_registers([IMPORT_ENERGY])
    except MeterError as exc:
        return f"unavailable: {exc}"
    return reading.value

