"""Serve's side of the writer process (see writer_child): starts it, wakes it when readings
arrive, keeps its figures and knows when it has drained the outbox. A writer process that
dies is an error of this task, so the supervisor starts a new one (and counts the restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pickle
import struct
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from headend.config import StorageConfig
from headend.storage.outbox import Outbox
from headend.storage.writer import WriterStats

log = logging.getLogger(__name__)

#: Figures that add up over the writer processes of one serve (a restarted one counts from 0).
_COUNTERS = ("written", "batches", "store_failures", "quarantined", "hook_failures", "outbox_failures")
#: A line from the writer process longer than this is not one of its messages.
_MAX_LINE = 16 * 1024 * 1024
#: After its stdin closed the writer process ends at once; one that does not is killed.
_EXIT_GRACE = 5.0

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


class WriterDied(RuntimeError):
    """The writer process ended while serve still needed it."""


class WriterProcess:
    def __init__(self, outbox: Outbox, job: WriterJob, *, on_days: DaysHook | None = None) -> None:
        self.outbox = outbox
        self.job = job
        #: Given each batch's stored meter-days (VEE on arrival validates them once closed).
        self.on_days = on_days
        self.stats = WriterStats()
        #: Values the writer found replacing a different stored value (VEE on arrival).
        self.conflicts = 0
        self._done = WriterStats()  # counters of the writer processes before the running one
        self._conflicts_done = 0
        self._stop = asyncio.Event()
        self._new_data = outbox.new_data_event()
        self._drained = asyncio.Event()

    async def run(self) -> None:
        """One writer process, until `stop()` or until it dies (WriterDied)."""
        if self._stop.is_set():
            return
        lock = self.outbox.writer_lock_fd
        if lock is None:
            raise RuntimeError("the outbox's writer lock is not held: lock_for_writer() first")
        self._drained.clear()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "headend.storage.writer_child",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, pass_fds=(lock,), limit=_MAX_LINE,
        )  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        stdin, stdout = proc.stdin, proc.stdout
        stats: dict[str, object] = {}
        conflicts = 0
        try:
            stdin.write(send_job(self.job))
            await stdin.drain()
            forward = asyncio.create_task(self._forward(stdin), name="writer-wake-ups")
            stopping = asyncio.create_task(self._stop.wait())
            try:
                while True:
                    reading = asyncio.create_task(stdout.readline())
                    await asyncio.wait([reading, stopping], return_when=asyncio.FIRST_COMPLETED)
                    if not reading.done():
                        reading.cancel()
                        break
                    line = reading.result()
                    if not line:
                        break  # the process ended
                    message = json.loads(line)
                    if "stats" in message:
                        stats = message["stats"]
                        conflicts = int(stats.get("conflicts", 0))  # type: ignore[call-overload]
                        self._show(stats, conflicts)
                    elif "drained" in message:
                        self._drained.set()
                    elif "days" in message and self.on_days is not None:
                        self._days(message["days"])
            finally:
                forward.cancel()
                stopping.cancel()
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                stdin.close()  # the writer process ends when it sees this
            try:
                async with asyncio.timeout(_EXIT_GRACE):
                    code = await proc.wait()
            except TimeoutError:
                proc.kill()
                code = await proc.wait()
            self._fold(stats, conflicts)
        if not self._stop.is_set():
            raise WriterDied(f"the writer process ended (exit status {code}); starting another")

    def _days(self, days: Mapping[str, list[int]]) -> None:
        assert self.on_days is not None
        try:
            self.on_days(days)
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
        self.conflicts = self._conflicts_done + conflicts

    def _fold(self, stats: Mapping[str, object], conflicts: int) -> None:
        """The ended process's counters become the base the next one counts from."""
        for name in _COUNTERS:
            setattr(self._done, name, getattr(self._done, name) + int(stats.get(name, 0)))  # type: ignore[call-overload]
        self._conflicts_done += conflicts

    async def _forward(self, stdin: asyncio.StreamWriter) -> None:
        while True:
            await self._new_data.wait()
            self._new_data.clear()
            self._drained.clear()
            stdin.write(b"n")
            await stdin.drain()

    async def wait_drained(self) -> None:
        """Return once the writer process has found the outbox empty after the last accept."""
        while True:
            await self._drained.wait()
            if self.outbox.depth() == 0:
                return
            self._drained.clear()

    def stop(self) -> None:
        self._stop.set()
