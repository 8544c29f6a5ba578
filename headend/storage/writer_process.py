"""Serve's side of the writer process (see writer_child): starts it, wakes it when readings
arrive, keeps its figures, knows when it has drained the outbox, and starts another when one
dies (with a pause that doubles while they keep dying, cut short by a stop).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pickle
import random
import signal
import struct
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from headend.config import StorageConfig
from headend.storage.outbox import Outbox
from headend.storage.writer import WriterStats, until_drained

log = logging.getLogger(__name__)

#: Figures that add up over the writer processes of one serve (a restarted one counts from 0).
#: `written` is not among them: the outbox counts it with the deletions, exactly.
_COUNTERS = ("batches", "store_failures", "quarantined", "hook_failures", "outbox_failures")
#: The writer's lines are short (it splits what it reports); a longer one is not one of them.
_MAX_LINE = 1024 * 1024
#: After its stdin closed the writer process ends at once; one that does not is killed.
_EXIT_GRACE = 5.0
#: A stop's signals (a terminal's Ctrl-C to the group, systemd's to the whole cgroup) are
#: serve's to act on: the writer ends when serve closes its pipe, after letting it drain.
#: It starts with them blocked (the mask survives exec) and ignores them before unblocking.
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
_BOOTSTRAP = ("import signal; signal.signal(signal.SIGINT, signal.SIG_IGN); "
              "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM}); "
              "from headend.storage.writer_child import main; main()")  # fmt: skip

DaysHook = Callable[[Mapping[str, list[int]]], None]


@dataclass(frozen=True)
class WriterJob:
    storage: StorageConfig
    #: VEE's versions database when values replacing different stored ones are to be noted
    #: (VEE on arrival), else None.
    vee_versions: Path | None
    log_level: int = logging.INFO


def send_job(job: WriterJob) -> bytes:
    body = pickle.dumps(job)
    return struct.pack(">I", len(body)) + body


class WriterProcess:
    def __init__(self, outbox: Outbox, job: WriterJob, *, on_days: DaysHook | None = None,
                 on_restart: Callable[[], None] | None = None, min_pause: float = 0.5,
                 max_pause: float = 30.0) -> None:  # fmt: skip
        self.outbox = outbox
        self.job = job
        #: Given each batch's stored meter-days (VEE on arrival validates them once closed).
        self.on_days = on_days
        #: Called each time a writer process died and another is to be started.
        self.on_restart = on_restart
        self.min_pause, self.max_pause = min_pause, max_pause
        self.stats = WriterStats()
        #: Values the writer found replacing a different stored value (VEE on arrival).
        self.conflicts = 0
        #: Writer processes that died and were started again.
        self.restarts = 0
        #: Lines from the writer process that were not one of its messages (logged, skipped).
        self.bad_lines = 0
        self.alive = False
        self._written_at_start = outbox.written()
        self._done = WriterStats()  # counters of the writer processes before the running one
        self._conflicts_done = 0
        self._stop = asyncio.Event()
        self._new_data = outbox.new_data_event()
        self._drained = asyncio.Event()

    async def run(self) -> None:
        """Writer processes, one after the other, until `stop()`."""
        loop = asyncio.get_running_loop()
        pause = self.min_pause
        while not self._stop.is_set():
            began = loop.time()
            code = await self._one()
            if self._stop.is_set():
                return
            self.restarts += 1
            self.stats.healthy = False
            self.stats.last_error = f"the writer process ended (exit status {code}); another starts in {pause:.1f} s"
            log.error("%s (restart %d); the outbox keeps what it had not written", self.stats.last_error,
                      self.restarts)  # fmt: skip
            if self.on_restart is not None:
                self.on_restart()
            if loop.time() - began > self.max_pause:
                pause = self.min_pause  # it had been running well: start over
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), pause * random.uniform(0.5, 1.0))
            pause = min(pause * 2, self.max_pause)

    async def _one(self) -> int:
        """One writer process, until it ends or `stop()`; its exit status."""
        lock = self.outbox.writer_lock_fd
        if lock is None:
            raise RuntimeError("the outbox's writer lock is not held: lock_for_writer() first")
        self._drained.clear()
        # Blocked in this thread only while the child is made: a stop signal meanwhile goes to
        # another of serve's threads, or waits here for the moment, and is handled as always.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", _BOOTSTRAP, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                pass_fds=(lock,), limit=_MAX_LINE, process_group=0,
            )  # fmt: skip
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        assert proc.stdin is not None and proc.stdout is not None
        stdin, stdout = proc.stdin, proc.stdout
        self.alive = True
        stats: dict[str, object] = {}
        conflicts = 0
        try:
            stdin.write(send_job(self.job))
            await stdin.drain()
            forward = asyncio.create_task(self._forward(stdin), name="writer-wake-ups")
            stopping = asyncio.create_task(self._stop.wait())
            try:
                while True:
                    reading = asyncio.create_task(self._line(stdout))
                    await asyncio.wait([reading, stopping], return_when=asyncio.FIRST_COMPLETED)
                    if not reading.done():
                        reading.cancel()
                        break
                    message = reading.result()
                    if message is None:
                        break  # the process ended
                    if "stats" in message:
                        stats = message["stats"]
                        conflicts = int(stats.get("conflicts", 0))
                        self._show(stats, conflicts)
                    elif "drained" in message:
                        self._drained.set()
                    elif "days" in message and self.on_days is not None:
                        self._days(message["days"])
            finally:
                forward.cancel()
                stopping.cancel()
        except (BrokenPipeError, ConnectionResetError):
            pass  # it ended before taking its job or a wake-up: its exit status tells why
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                stdin.close()  # the writer process ends when it sees this
            try:
                async with asyncio.timeout(_EXIT_GRACE):
                    code = await proc.wait()
            except TimeoutError:
                proc.kill()
                code = await proc.wait()
            self.alive = False
            self._fold(stats, conflicts)
        return code

    async def _line(self, stdout: asyncio.StreamReader) -> dict[str, object] | None:
        """The writer's next message; None when it ended. What is not one is logged and skipped."""
        while True:
            try:
                line = await stdout.readline()
            except ValueError:  # longer than any message it sends (the rest is cleared)
                line = b"\0"
            if not line.endswith(b"\n"):
                return None  # the end, or a line cut short by its death
            try:
                message = json.loads(line)
                if isinstance(message, dict):
                    return message
            except ValueError:
                pass
            self.bad_lines += 1
            log.error("the writer process said something that is not one of its messages: %r", line[:200])

    def _days(self, days: object) -> None:
        assert self.on_days is not None
        try:
            self.on_days(days)  # type: ignore[arg-type]
        except Exception:  # what is stored stays stored; the hook's failure is its own
            self._done.hook_failures += 1
            self.stats.hook_failures += 1
            log.exception("after-write hook failed")

    def _show(self, stats: Mapping[str, object], conflicts: int) -> None:
        for f in fields(WriterStats):
            value = stats.get(f.name, getattr(self.stats, f.name))
            if f.name in _COUNTERS:
                value = getattr(self._done, f.name) + int(value)  # type: ignore[call-overload]
            setattr(self.stats, f.name, value)
        self.stats.written = self.outbox.written() - self._written_at_start
        self.conflicts = self._conflicts_done + conflicts

    def _fold(self, stats: Mapping[str, object], conflicts: int) -> None:
        """The ended process's counters become the base the next one counts from."""
        for name in _COUNTERS:
            setattr(self._done, name, getattr(self._done, name) + int(stats.get(name, 0)))  # type: ignore[call-overload]
        self._conflicts_done += conflicts
        self.stats.written = self.outbox.written() - self._written_at_start

    async def _forward(self, stdin: asyncio.StreamWriter) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it ended: _one sees why
            while True:
                await self._new_data.wait()
                self._new_data.clear()
                self._drained.clear()
                stdin.write(b"n")
                await stdin.drain()

    async def wait_drained(self) -> None:
        """Return once the writer process has found the outbox empty after the last accept."""
        await until_drained(self._drained, self.outbox)

    def stop(self) -> None:
        self._stop.set()
