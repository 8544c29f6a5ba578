"""When plans are due: every N (aligned to boundaries of N since midnight UTC) or cron-like."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from headend.config import Plan

_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day", 1, 31), ("month", 1, 12), ("weekday", 0, 6))


def _cron_field(text: str, low: int, high: int, name: str) -> set[int]:
    values: set[int] = set()
    for part in text.split(","):
        base, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if base == "*":
            start, end = low, high
        elif "-" in base:
            a, b = base.split("-", 1)
            start, end = int(a), int(b)
        else:
            start = end = int(base)
        if not (low <= start <= end <= high) or step < 1:
            raise ValueError(f"cron {name} {part!r} is outside {low}..{high}")
        values.update(range(start, end + 1, step))
    return values


def parse_cron(expr: str) -> list[set[int]]:
    """Five fields: minute hour day-of-month month day-of-week (0 = Sunday), UTC."""
    parts = expr.split()
    if len(parts) != 5:
        raise ValueError(f"cron {expr!r} needs 5 fields")
    return [_cron_field(p, lo, hi, name) for p, (name, lo, hi) in zip(parts, _FIELDS, strict=True)]


def next_due(plan: Plan, after: datetime) -> datetime:
    """The first moment strictly after `after` at which the plan runs."""
    after = after.astimezone(UTC)
    if plan.every is not None:
        epoch = after.replace(hour=0, minute=0, second=0, microsecond=0)
        return epoch + ((after - epoch) // plan.every + 1) * plan.every
    assert plan.cron is not None
    minutes, hours, days, months, weekdays = parse_cron(plan.cron)
    t = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
    for _ in range(366 * 24 * 60):  # a year of minutes bounds the search
        if (t.minute in minutes and t.hour in hours and t.day in days and t.month in months
                and (t.isoweekday() % 7) in weekdays):  # fmt: skip
            return t
        t += timedelta(minutes=1)
    raise ValueError(f"cron {plan.cron!r} never matches")
