"""Runs switching commands: reconnects first, disconnects paced per link, deferred ones at
their window, and whatever a restart left in the journal.

- Reconnects have workers of their own: a disconnect stuck on a dead meter never holds one up.
- Disconnects wait for their link's pacing in a per-link line, not in a worker.
- A command is handed to the engine, which claims it in the journal before any I/O; a
  command whose meter is busy with another waits until that one is done.
- After a restart (`start`), `sent` commands are confirmed by read-back (retried while the
  meter or concentrator cannot be reached yet, never failed for it), claimed ones go back
  to the queue, queued and deferred ones are taken on like new ones (paced, reconnects
  first). `start` returns at once; the read-backs run beside the API.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator

from headend.model import RelayAction
from headend.supervisor import Supervisor
from headend.switching.engine import SwitchingEngine, _ns
from headend.switching.journal import Command, CommandState
from headend.switching.ratelimit import LinkLimiter

log = logging.getLogger(__name__)

_FINISHED = frozenset({
    CommandState.REJECTED, CommandState.CONFIRMED, CommandState.CONFIRMED_READY, CommandState.FAILED,
    CommandState.EXPIRED, CommandState.CANCELLED, CommandState.DRY_RUN_OK,
})  # fmt: skip


class CommandRunner:
    def __init__(self, engine: SwitchingEngine, *, workers: int = 8, reconnect_workers: int = 4,
                 limiter: LinkLimiter | None = None, tick: float = 1.0, busy_retry: float = 5.0,
                 monotonic: Callable[[], float] = time.monotonic,
                 supervisor: Supervisor | None = None) -> None:  # fmt: skip
        self.engine = engine
        #: Its workers and timer run supervised: a bug that escapes their own guards restarts them.
        self.supervisor = supervisor or Supervisor()
        self.workers = workers
        self.reconnect_workers = reconnect_workers
        self.limiter = limiter
        #: Longest sleep of the timer: wall-clock steps (deferred commands) are seen this soon.
        self.tick = tick
        self.busy_retry = busy_retry
        self.monotonic = monotonic
        self.owner = f"runner-{uuid.uuid4().hex[:12]}"
        self._reconnects: asyncio.Queue[str] = asyncio.Queue()
        self._disconnects: asyncio.Queue[str] = asyncio.Queue()
        self._paced: dict[str, collections.deque[str]] = {}
        self._links: dict[str, str] = {}  # disconnect handed to a worker -> its link
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._capacity: dict[str, int] = {}
        self._pacing: set[str] = set()  # links with a release scheduled
        self._timers: list[tuple[float, int, str, str]] = []  # (monotonic due, n, kind, id)
        self._deferred: list[tuple[int, int, str]] = []  # (wall ns not_before, n, id)
        self._order = itertools.count()
        self._tracked: set[str] = set()
        #: Commands waiting for a window or an approval -> the due time of their current timer
        #: entry (an entry with another due time is stale).
        self._waiting: dict[str, int] = {}
        self._blocked: dict[str, set[str]] = {}  # meter -> commands waiting for it
        self._blocked_ids: set[str] = set()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: list[asyncio.Task[None]] = []
        self._side: set[asyncio.Task[None]] = set()

    # -- taking commands on -----------------------------------------------------------

    def submit(self, command: Command) -> None:
        """Take a command on, whatever state the journal has it in; the same command twice is one."""
        waiting = (CommandState.DEFERRED, CommandState.AWAITING_APPROVAL)
        if command.id in self._waiting:
            if command.state not in waiting:
                self._untrack(command.id)  # its wait is over (approved): its timer entry goes stale
            elif command.state == CommandState.DEFERRED:
                # Approved outside a window: it now waits for the window, not for the
                # approval's deadline (it waited up to 4 days and expired).
                self._wait_until(command.id, command.not_before_ns or 0)
                return
        if command.id in self._tracked:
            return
        if command.state == CommandState.QUEUED:
            self._track(command.id)
            self._enqueue(command)
        elif command.state == CommandState.DEFERRED:
            self._track(command.id, due_ns=command.not_before_ns or 0)
        elif command.state == CommandState.AWAITING_APPROVAL and command.expires_ns is not None:
            self._track(command.id, due_ns=command.expires_ns)  # to expire it if nobody approves in time
        elif command.state == CommandState.SENT:
            self._track(command.id)
            self._spawn(self._reconfirm(command))

    def _wait_until(self, command_id: str, due_ns: int) -> None:
        """(Re)time a waiting command's release; an entry of an earlier wait goes stale."""
        self._waiting[command_id] = due_ns
        heapq.heappush(self._deferred, (due_ns, next(self._order), command_id))
        self._wake.set()

    def _enqueue(self, command: Command) -> None:
        if command.action == RelayAction.RECONNECT:
            self._reconnects.put_nowait(command.id)  # never paced
            return
        link, gate = self.engine.admission.gate(command.meter)
        self._links[command.id] = link
        # No link may hold more than half the workers: one whose relays hang (each command
        # held for attempts x confirm_timeout) leaves the rest to the other links.
        self._capacity[link] = min(gate.capacity, max(1, self.workers // 2))
        self._paced.setdefault(link, collections.deque()).append(command.id)
        self._release(link)

    def _release(self, link: str) -> None:
        """Move disconnects of `link` (a line, bus or concentrator) to the workers as fast as its
        pacing allows, and no more at once than the link carries: the others wait in its line,
        not in a worker, so a link whose relays hang never starves the other links."""
        line = self._paced.get(link)
        while line and self._in_flight[link] < self._capacity[link]:
            wait = self.limiter.take(link) if self.limiter is not None else 0.0
            if wait > 0:
                if link not in self._pacing:
                    self._pacing.add(link)
                    self._timer(wait, "pace", link)
                return
            self._in_flight[link] += 1
            self._disconnects.put_nowait(line.popleft())

    def _dispatched_done(self, command_id: str) -> None:
        link = self._links.pop(command_id, None)
        if link is not None:
            self._in_flight[link] -= 1
            self._release(link)

    def _timer(self, delay: float, kind: str, key: str) -> None:
        heapq.heappush(self._timers, (self.monotonic() + delay, next(self._order), kind, key))
        self._wake.set()

    def _track(self, command_id: str, *, due_ns: int | None = None) -> None:
        """Taken on; with `due_ns`, waiting until then (a window, an approval's deadline)."""
        self._tracked.add(command_id)
        if due_ns is not None:
            self._wait_until(command_id, due_ns)
        self._update_idle()

    def _untrack(self, command_id: str) -> None:
        self._tracked.discard(command_id)
        self._blocked_ids.discard(command_id)
        self._waiting.pop(command_id, None)
        self._update_idle()

    def _update_idle(self) -> None:
        if len(self._tracked) > len(self._waiting):
            self._idle.clear()
        else:
            self._idle.set()

    def clock_changed(self) -> None:
        """Look at deferred commands now (a simulated or stepped wall clock)."""
        self._wake.set()

    # -- the tasks -----------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        while True:
            now_wall = _ns(self.engine.now())
            while self._deferred and self._deferred[0][0] <= now_wall:
                due, _n, command_id = heapq.heappop(self._deferred)
                if self._waiting.get(command_id) != due:
                    continue  # stale: approved, re-timed or taken on again since
                # Still tracked while its release waits for the journal thread: `join()` must
                # not see the runner idle meanwhile, and an approval arriving meanwhile finds it
                # taken on (its `submit` does nothing); the release's answer routes it, once.
                del self._waiting[command_id]
                self._update_idle()
                with self._guard(command_id):
                    released = await self.engine.off_loop(self.engine.release_waiting, command_id)
                    self._tracked.discard(command_id)
                    self._after(released)
            now = self.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _due, _n, kind, key = heapq.heappop(self._timers)
                with self._guard(key):
                    if kind == "pace":
                        self._pacing.discard(key)
                        self._release(key)
                    elif key in self._blocked_ids:  # "retry": a command whose meter was busy
                        self._unblock(key)
            delay = self.tick
            if self._timers:
                delay = min(delay, max(0.0, self._timers[0][0] - self.monotonic()))
            if self._deferred:
                delay = min(delay, max(0.0, (self._deferred[0][0] - _ns(self.engine.now())) / 1e9))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    async def _work(self, queue: asyncio.Queue[str], name: str) -> None:
        owner = f"{self.owner}/{name}"
        while True:
            command_id = await queue.get()
            try:
                command = await self.engine.run(command_id, owner)
                self._dispatched_done(command_id)
                self._after(command)
            except Exception:  # one command's bug must not stop the others
                log.exception("switching command %s crashed", command_id)
                self._dispatched_done(command_id)
                self._untrack(command_id)

    def _after(self, command: Command) -> None:
        """Route a command by the state a run (or release) left it in."""
        if command.state == CommandState.QUEUED:
            if command.id in self._tracked:
                # Not claimed: another command of the meter is running or sent. Try again when
                # that one is done here, or after `busy_retry` if it runs elsewhere.
                self._blocked.setdefault(command.meter, set()).add(command.id)
                self._blocked_ids.add(command.id)
                self._timer(self.busy_retry, "retry", command.id)
                return
            self.submit(command)
            return
        self._untrack(command.id)
        if command.state in (CommandState.DEFERRED, CommandState.AWAITING_APPROVAL):
            self.submit(command)
        elif command.state in _FINISHED:
            self._meter_free(command.meter)

    def _meter_free(self, meter: str) -> None:
        for waiting in self._blocked.pop(meter, set()):
            if waiting in self._blocked_ids:
                self._unblock(waiting)

    def _unblock(self, command_id: str) -> None:
        self._blocked_ids.discard(command_id)
        self._tracked.discard(command_id)
        self.submit(self.engine.journal.get(command_id))

    async def _reconfirm(self, command: Command) -> None:
        pause = 0.5
        while True:
            try:
                done = await self.engine.reconfirm(command)
            except Exception:
                log.exception("re-confirming command %s crashed", command.id)
                done = None
            if done is not None:
                self._untrack(command.id)
                self._meter_free(command.meter)
                return
            await asyncio.sleep(pause)  # the meter or its concentrator is not reachable yet
            pause = min(pause * 2, 5.0)

    @contextlib.contextmanager
    def _guard(self, key: str) -> Iterator[None]:
        """One command's (or link's) bug is logged and never stops the timer for the rest."""
        try:
            yield
        except Exception:
            log.exception("switching: handling %s failed", key)
            self._untrack(key)

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)  # type: ignore[arg-type]
        self._side.add(task)
        task.add_done_callback(self._side.discard)

    async def _recover(self) -> None:
        """The journal's side of a restart (no meter I/O); read-backs run as tasks."""
        recovered = await self.engine.off_loop(self.engine.recover)
        for command in recovered:
            log.info("after a restart: command %s (%s %s) is %s", command.id, command.action, command.meter,
                     command.state)  # fmt: skip
            self.submit(command)
        if recovered:
            log.info("after a restart: %d open switching commands taken on", len(recovered))

    # -- life ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Take on what the journal holds and start the workers; returns at once (read-backs
        of commands a restart found `sent` go on beside). Recovery comes first: a command the
        new workers claim is never mistaken for one a dead process left."""
        await self._recover()

        def worker(queue: asyncio.Queue[str], name: str) -> Callable[[], Awaitable[None]]:
            return lambda: self._work(queue, name)

        start = self.supervisor.start
        self._tasks = [start(f"switching-d{i}", worker(self._disconnects, f"d{i}")) for i in range(self.workers)]
        self._tasks += [start(f"switching-r{i}", worker(self._reconnects, f"r{i}"))
                        for i in range(self.reconnect_workers)]  # fmt: skip
        self._tasks.append(start("switching-timers", self._timer_loop))

    async def join(self) -> None:
        """Wait until every command taken on has run (deferred ones excepted): tests, tools."""
        await self._idle.wait()

    @property
    def deferred(self) -> int:
        return len(self._waiting)

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._side]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
