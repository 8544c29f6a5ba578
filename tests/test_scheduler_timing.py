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
    with pytest.raises(ConfigError, match=r"cron hour '25' is outside 0\.\.23"):
        plan(cron="0 25 * * *")
