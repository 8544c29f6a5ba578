"""Long-lived tasks that must not end by accident: concentrator links, the outbox writer, VEE
on arrival. An exception is logged with its traceback, counted per task and the task is
started again after a pause that doubles up to `max_backoff`; a task that returns has
finished its work (a stop) and stays ended. `restarts` feeds the
`headend_task_restarts_total{task}` metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self, *, min_backoff: float = 0.5, max_backoff: float = 30.0,
                 on_restart: Callable[[str], None] | None = None) -> None:  # fmt: skip
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.on_restart = on_restart
        self.restarts: Counter[str] = Counter()
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        task = asyncio.create_task(self._keep(name, run), name=name)
        self._tasks[name] = task
        return task

    def note_restart(self, name: str) -> None:
        """A task that restarts a part of its own (a child process) counts it here too."""
        self.restarts[name] += 1
        if self.on_restart is not None:
            self.on_restart(name)

    async def _keep(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        pause = self.min_backoff
        loop = asyncio.get_running_loop()
        while True:
            began = loop.time()
            try:
                await run()
                return
            except Exception:
                if loop.time() - began > self.max_backoff:
                    pause = self.min_backoff  # it had been running well: start over
                self.restarts[name] += 1
                log.exception("task %s failed (restart %d); starting it again in %.1f s", name,
                              self.restarts[name], pause)  # fmt: skip
                if self.on_restart is not None:
                    self.on_restart(name)
            await asyncio.sleep(pause * random.uniform(0.5, 1.0))  # not a hot loop of failures
            pause = min(pause * 2, self.max_backoff)

    async def stop(self) -> None:
        tasks, self._tasks = list(self._tasks.values()), {}
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
