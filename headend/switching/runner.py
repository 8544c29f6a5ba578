"""Runs queued switching commands: reconnects go ahead of disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging

from headend.model import RelayAction
from headend.switching.engine import SwitchingEngine
from headend.switching.journal import Command, CommandState
from headend.switching.ratelimit import LinkLimiter

log = logging.getLogger(__name__)


class CommandRunner:
    def __init__(self, engine: SwitchingEngine, *, workers: int = 8, limiter: LinkLimiter | None = None) -> None:
        self.engine = engine
        self.workers = workers
        self.limiter = limiter
        self._queue: asyncio.PriorityQueue[tuple[int, int, str]] = asyncio.PriorityQueue()
        self._order = itertools.count()
        self._tasks: list[asyncio.Task[None]] = []

    def submit(self, command: Command) -> None:
        if command.state == CommandState.QUEUED:
            priority = 0 if command.action == RelayAction.RECONNECT else 1
            self._queue.put_nowait((priority, next(self._order), command.id))

    async def _work(self) -> None:
        while True:
            priority, _n, command_id = await self._queue.get()
            try:
                if priority > 0 and self.limiter is not None:
                    command = self.engine.journal.get(command_id)
                    await self.limiter.acquire(self.engine.registry.link_of(command.meter).id)
                await self.engine.run(command_id)
            except Exception:  # one command's bug must not stop the others
                log.exception("switching command %s crashed", command_id)
            finally:
                self._queue.task_done()

    async def start(self) -> None:
        for command in await self.engine.recover():
            log.info("recovered command %s: %s", command.id, command.state)
        self._tasks = [asyncio.create_task(self._work(), name=f"switching-{i}") for i in range(self.workers)]

    async def join(self) -> None:
        """Wait until every submitted command has run (tests, shutdown)."""
        await self._queue.join()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
