"""One plan on its schedule, under a watchdog: the loop never silently stops.

Each run starts at the plan's next due time plus jitter inside the first tenth of its window
(to spread a fleet's sessions) and is bounded by the plan's `deadline` (default: until the
next run is due), so a hung meter or link cannot hold the plan. An unexpected exception in a
run is logged with its traceback, counted, and the loop starts again after a pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from headend.config import Plan
from headend.scheduler.engine import MeterResult, PlanReport, PollingEngine
from headend.scheduler.timing import next_due

log = logging.getLogger(__name__)


async def wait_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max(0.0, seconds))


@dataclass
class LoopStats:
    runs: int = 0
    restarts: int = 0
    last_finished: datetime | None = None
    last_error: str = ""
    reports: list[PlanReport] = field(default_factory=list)


class PlanLoop:
    def __init__(
        self,
        plan: Plan,
        engine: PollingEngine,
        *,
        on_result: Callable[[MeterResult], None] | None = None,
        on_report: Callable[[PlanReport], None] | None = None,
        on_restart: Callable[[BaseException], None] | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        pause: Callable[[asyncio.Event, float], Awaitable[None]] = wait_or_stop,
        restart_delay: float = 5.0,
        jitter: bool = True,
        keep_reports: int = 0,
    ) -> None:
        self.plan = plan
        self.engine = engine
        self.on_result = on_result
        self.on_report = on_report
        self.on_restart = on_restart
        self.clock = clock
        self.pause = pause
        self.restart_delay = restart_delay
        self.jitter = jitter
        self.keep_reports = keep_reports
        self.stats = LoopStats()

    def deadline_s(self, due: datetime) -> float:
        if self.plan.deadline is not None:
            return self.plan.deadline.total_seconds()
        return (next_due(self.plan, due) - due).total_seconds()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.run_once(stop)
            except Exception as exc:  # the watchdog: log, count, start again
                self.stats.restarts += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("plan %s: run failed, restarting in %.0f s", self.plan.id, self.restart_delay)
                if self.on_restart is not None:
                    self.on_restart(exc)
                await self.pause(stop, self.restart_delay)

    async def run_once(self, stop: asyncio.Event) -> PlanReport | None:
        now = self.clock()
        due = next_due(self.plan, now)
        spread = random.uniform(0, self.plan.window.total_seconds() / 10) if self.jitter else 0.0
        await self.pause(stop, (due - now).total_seconds() + spread)
        if stop.is_set():
            return None
        report = await self.engine.run_plan(
            self.plan, self.clock(), deadline_s=self.deadline_s(due), on_result=self.on_result
        )
        self.stats.runs += 1
        self.stats.last_finished = self.clock()
        if self.keep_reports:
            self.stats.reports = [*self.stats.reports, report][-self.keep_reports :]
        if self.on_report is not None:
            self.on_report(report)
        return report
