"""Each validation rule, table-driven: a case that passes and a case that fails, with the
intervals the failing case must flag (and no others)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from headend.config import Meter, VeeConfig
from headend.model import IMPORT_ENERGY, IMPORT_INTERVAL, Reading
from headend.storage.codec import to_ns
from headend.storage.columns import Columns
from headend.vee import rules
from headend.vee.series import Exchange, build
from tests.vee_data import PER_DAY, STEP, T0, cumulative, deltas, load, t_of

DAYS = 2
N = DAYS * PER_DAY


def register_reads(n_days: int, *, short_last_day: float = 0.0, offset_s: int = 40) -> list[Reading]:
    """Daily register reads taken `offset_s` after midnight, as a scheduler would; the last
    one `short_last_day` kWh above what the intervals add up to."""
    out, total = [], 1000.0
    for day in range(n_days + 1):
        if day:
            total += sum(load(k) for k in range((day - 1) * PER_DAY, day * PER_DAY))
        value = total + (short_last_day if day == n_days else 0.0)
        out.append(Reading("M", IMPORT_ENERGY, T0 + timedelta(days=day, seconds=offset_s), value, kind="register"))
    return out


@dataclass
class Case:
    rule: str
    source: str  # "deltas" or "cumulative"
    flagged: set[int]  # interval indexes the rule must flag (empty: the passing case)
    change: dict[int, float | None] = field(default_factory=dict)  # interval -> value (None: drop)
    extra: list[Reading] = field(default_factory=list)
    qualities: dict[int, tuple[str, ...]] = field(default_factory=dict)
    multiplier: float = 1.0
    meter: dict[str, Any] = field(default_factory=dict)
    registers: list[Reading] = field(default_factory=list)
    disconnected: list[tuple[int, int]] = field(default_factory=list)  # interval index ranges
    weeks: int = 0  # days of history before the period, in weeks
    cfg: dict[str, Any] = field(default_factory=dict)
    id: str = ""


def zeros(first: int, last: int) -> dict[int, float | None]:
    return dict.fromkeys(range(first, last + 1), 0.0)


OFF_GRID = Reading("M", IMPORT_INTERVAL, t_of(19) - timedelta(minutes=8), 0.4, unit="kWh")  # 8 min early
CASES = [
    Case("gap", "deltas", set(), id="gap: complete day"),
    Case("gap", "deltas", {10, 11}, change={10: None, 11: None}, id="gap: two intervals missing"),
    Case("gap", "cumulative", {10, 11}, change={10: None}, id="gap: one register missing leaves two intervals"),
    Case("duplicate", "deltas", set(), extra=[Reading("M", IMPORT_INTERVAL, t_of(5),
         load(5), unit="kWh")], id="duplicate: same value twice"),
    Case("duplicate", "deltas", {5}, extra=[Reading("M", IMPORT_INTERVAL, t_of(5), 9.0,
         unit="kWh")], id="duplicate: two values for one interval"),
    Case("alignment", "deltas", set(), id="alignment: all on the grid"),
    Case("alignment", "deltas", {19}, change={19: None}, extra=[OFF_GRID], id="alignment: a stamp 8 min off"),
    Case("clock", "deltas", set(), qualities={3: ("1.0.1",)}, id="clock: other meter status"),
    Case("clock", "deltas", {3, 4}, qualities={3: ("2.6.16",), 4: ("1.0.32",)}, id="clock: drift flag, status bit"),
    Case("negative_delta", "deltas", set(), change={7: 0.0}, id="negative_delta: zero is fine"),
    Case("negative_delta", "deltas", {7}, change={7: -0.2}, id="negative_delta: below zero"),
    Case("rollback", "cumulative", set(), id="rollback: the register only goes up"),
    Case("rollback", "cumulative", {40}, change={40: 1000.0}, id="rollback: register goes back"),
    Case("rollback", "cumulative", set(), meter={"register_digits": 4}, id="rollback: rollover at 10^4 is not one"),
    Case("sum_check", "deltas", set(), registers=register_reads(DAYS), id="sum_check: intervals add up"),
    Case("sum_check", "deltas", set(range(PER_DAY, N)), registers=register_reads(2, short_last_day=1.0),
         id="sum_check: second day 1 kWh short"),
    Case("spike", "deltas", set(), change={50: 0.7}, id="spike: below 1.5 x third highest"),
    Case("spike", "deltas", {50}, change={50: 2.5}, id="spike: one interval 5x"),
    Case("spike", "deltas", set(), change={50: 0.9}, cfg={"spike_min_kwh": 1.0, "spike_ratio": 1.5},
         id="spike: high ratio but under the minimum energy"),
    Case("high_low", "deltas", set(), weeks=4, id="high_low: like the same weekday"),
    Case("high_low", "deltas", set(range(PER_DAY, N)), weeks=4,
         change={k: 3 * load(k) for k in range(PER_DAY, N)}, id="high_low: a day 3x its like days"),
    Case("high_low", "deltas", set(range(PER_DAY)), weeks=4,
         change={k: 0.2 * load(k) for k in range(PER_DAY)}, id="high_low: a day at 0.2x"),
    Case("prolonged_zero", "deltas", set(), change=zeros(0, 20), id="prolonged_zero: 5 h of zero is fine"),
    Case("prolonged_zero", "deltas", set(range(10, 70)), change=zeros(10, 69), id="prolonged_zero: 15 h of zero"),
    Case("prolonged_zero", "deltas", set(), change=zeros(10, 69), disconnected=[(10, 69)],
         id="prolonged_zero: zero while disconnected"),
    Case("after_disconnect", "deltas", set(), change=zeros(10, 69), disconnected=[(10, 69)],
         id="after_disconnect: nothing flows"),
    Case("after_disconnect", "deltas", set(range(60, 70)), change=zeros(10, 59), disconnected=[(10, 69)],
         id="after_disconnect: consumption while the relay is open"),
    Case("multiplier", "deltas", set(), multiplier=40.0, meter={"ct": {"primary": 200, "secondary": 5}},
         id="multiplier: as registered"),
    Case("multiplier", "deltas", set(range(N)), multiplier=1.0, meter={"ct": {"primary": 200, "secondary": 5}},
         id="multiplier: read with 1, registered 40"),
]


def run_case(case: Case) -> set[int]:
    weeks = timedelta(weeks=case.weeks)
    history_start = T0 - weeks
    n_hist = case.weeks * 7 * PER_DAY
    change = case.change

    def shift(k: int, v: float) -> float | None:
        j = k - n_hist
        return change.get(j, v) if j in change else v

    if case.source == "deltas":
        readings = deltas("M", n_hist + N, start=history_start, multiplier=case.multiplier, change=shift,
                          qualities={k + n_hist: q for k, q in case.qualities.items()})  # fmt: skip
    else:
        modulus = 10.0 ** case.meter.get("register_digits", 8)
        base = modulus - 30.0 if "register_digits" in case.meter else 1000.0  # wraps on the first day
        readings = cumulative("M", n_hist + N, start=history_start, base=base, change=shift,
                              qualities={k + n_hist: q for k, q in case.qualities.items()})  # fmt: skip
        if "register_digits" in case.meter:
            readings = [r.__class__(**{**_fields(r), "value": (r.value or 0) % modulus}) for r in readings]
    readings += case.extra
    meter = Meter.model_validate({"id": "M", "link": "l", **case.meter})
    cfg = VeeConfig.model_validate(case.cfg)
    columns = Columns.of_readings(readings)
    series = build("M", history_start, T0 + N * STEP, STEP,
                   cumulative=columns if case.source == "cumulative" else None,
                   deltas=columns if case.source == "deltas" else None, registers=Columns.of_readings(case.registers),
                   register_modulus=10.0**meter.register_digits)  # fmt: skip
    ctx = rules.Context(meter, cfg, disconnected=[(t_of(a) - STEP, t_of(b)) for a, b in case.disconnected])
    ctx.history = series
    rule = {**rules.INTERVAL_RULES, **rules.DAY_RULES}[case.rule]
    rule(series, ctx)
    index_of = {to_ns(t_of(k)): k for k in range(-n_hist - 1, N)}
    flagged = rules.failed(series, case.rule) & (series.t > to_ns(T0))
    return {index_of[t] for t in series.t[flagged].tolist()}


def _fields(r: Reading) -> dict[str, Any]:
    return {name: getattr(r, name) for name in r.__dataclass_fields__}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_rule(case: Case) -> None:
    assert run_case(case) == case.flagged
    assert rules.CODES[case.rule]


def test_every_rule_has_a_passing_and_a_failing_case() -> None:
    for name in rules.CODES:
        outcomes = {bool(c.flagged) for c in CASES if c.rule == name}
        assert outcomes == {True, False}, name


def test_a_rollover_gives_the_true_consumption() -> None:
    base = 10_000.0 - 5.0
    readings = [r.__class__(**{**_fields(r), "value": (r.value or 0) % 10_000}) for r in
                cumulative("M", 40, base=base)]  # fmt: skip
    series = build("M", T0 - STEP, T0 + 40 * STEP, STEP, cumulative=Columns.of_readings(readings),
                   register_modulus=10_000.0)  # fmt: skip
    assert series.rollover.sum() == 1
    assert [round(v, 6) for v in series.value[1:].tolist()] == [round(load(k), 6) for k in range(40)]


def test_a_recorded_meter_exchange_starts_a_new_baseline() -> None:
    old = cumulative("M", 20)  # the old meter's register up to the end of interval 19
    before = sum(load(k) for k in range(20))
    # The new meter starts at 0 kWh five minutes into interval 20.
    new = [r.__class__(**{**_fields(r), "value": (r.value or 0) - 1000.0 - before})
           for r in cumulative("M", 40) if r.timestamp > t_of(19)]  # fmt: skip
    exchange = Exchange(t_of(19) + timedelta(minutes=5), baseline=0.0, multiplier=1.0)
    series = build("M", T0, T0 + 40 * STEP, STEP, cumulative=Columns.of_readings(old + new), exchanges=[exchange])
    values = dict(zip(series.t.tolist(), series.value.tolist(), strict=True))
    assert values[to_ns(t_of(20))] == pytest.approx(load(20))  # not the old register's 1000-odd kWh backwards
    assert all(v > 0 for v in values.values())  # and none unknown (NaN)


def test_billing_days_are_local_days() -> None:
    series = build("M", T0, T0 + 2 * PER_DAY * STEP, STEP, deltas=Columns.of_readings(deltas("M", 2 * PER_DAY)))
    utc = rules.days(series, ZoneInfo("UTC"))
    berlin = rules.days(series, ZoneInfo("Europe/Berlin"))  # UTC+1 in March
    assert [s.stop - s.start for _d, s in utc] == [PER_DAY, PER_DAY]
    # the first local day began an hour before T0
    assert [s.stop - s.start for _d, s in berlin] == [PER_DAY - 4, PER_DAY, 4]
    assert series.t[berlin[1][1].start] == to_ns(T0 + timedelta(hours=23, minutes=15))  # 00:15 local
