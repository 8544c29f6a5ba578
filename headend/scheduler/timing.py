"""When plans are due: every N (aligned to boundaries of N since midnight UTC) or cron (standard
semantics, UTC, by cronsim: a day-of-month and a day-of-week both restricted match either)."""

from __future__ import annotations

from datetime import UTC, datetime

from cronsim import CronSim, CronSimError

from headend.config import Plan


def next_due(plan: Plan, after: datetime) -> datetime:
    """The first moment strictly after `after` at which the plan runs."""
    after = after.astimezone(UTC)
    if plan.every is not None:
        epoch = after.replace(hour=0, minute=0, second=0, microsecond=0)
        return epoch + ((after - epoch) // plan.every + 1) * plan.every
    assert plan.cron is not None
    try:
        return next(CronSim(plan.cron, after))  # strictly after `after`
    except (CronSimError, StopIteration):
        raise ValueError(f"cron {plan.cron!r} never matches") from None
