"""When plans run."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from headend.config import ConfigError, Plan, parse_config
from headend.scheduler.timing import next_due


def plan(**when: str) -> Plan:
    return parse_config({"plans": [{"id": "p", "read": ["clock"], **when}]}).plans[0]


@pytest.mark.parametrize(
    ("when", "after", "due"),
    [
        ({"every": "15m"}, datetime(2026, 3, 9, 10, 7, 13, tzinfo=UTC), datetime(2026, 3, 9, 10, 15, tzinfo=UTC)),
        ({"every": "15m"}, datetime(2026, 3, 9, 10, 15, tzinfo=UTC), datetime(2026, 3, 9, 10, 30, tzinfo=UTC)),
        ({"every": "1d"}, datetime(2026, 3, 9, 23, 59, tzinfo=UTC), datetime(2026, 3, 10, tzinfo=UTC)),
        ({"cron": "5 0 * * *"}, datetime(2026, 3, 9, 10, 0, tzinfo=UTC), datetime(2026, 3, 10, 0, 5, tzinfo=UTC)),
        ({"cron": "*/20 8-9 * * 1-5"}, datetime(2026, 3, 13, 9, 41, tzinfo=UTC),  # a Friday
         datetime(2026, 3, 16, 8, 0, tzinfo=UTC)),  # next Monday
    ],
)  # fmt: skip
def test_next_due(when: dict[str, str], after: datetime, due: datetime) -> None:
    assert next_due(plan(**when), after) == due


def test_a_bad_cron_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"cron '0 25 \* \* \*': Bad hour"):
        plan(cron="0 25 * * *")


def test_a_cron_that_can_never_fire_is_refused_at_load() -> None:
    with pytest.raises(ConfigError, match=r"plans\[0\]\.cron \(id \"p\"\).*'0 0 30 2 \*': Bad day-of-month"):
        plan(cron="0 0 30 2 *")
    leap = plan(cron="0 0 29 2 *")  # fires, in leap years
    assert next_due(leap, datetime(2026, 3, 9, tzinfo=UTC)) == datetime(2028, 2, 29, tzinfo=UTC)


def test_day_of_month_and_day_of_week_match_either_as_cron_does() -> None:
    """Standard cron: both restricted means the 13th OR a Friday, not Friday the 13th only."""
    thirteenth_or_friday = plan(cron="0 6 13 * 5")
    after = datetime(2026, 3, 1, tzinfo=UTC)
    seen = []
    for _ in range(5):
        after = next_due(thirteenth_or_friday, after)
        seen.append(after.day)
    assert seen == [6, 13, 20, 27, 3]  # Fridays in March, the 13th (also a Friday), then Friday 3 April
