"""VEE over a real store (SQLite and InfluxDB): estimation of short and long gaps adds up to
the register, estimates and edits are versions, the raw reads stay untouched."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from headend.config import parse_config
from headend.model import EVENT_LOG, IMPORT_INTERVAL, Quality, Reading, RelayAction
from headend.registry import Registry
from headend.storage.base import ReadingStore
from headend.storage.codec import to_ns
from headend.switching import journal as journal_module
from headend.switching.journal import CommandJournal, CommandState
from headend.vee.service import VeeService
from headend.vee.store import VeeStore
from tests.vee_data import PER_DAY, STEP, T0, cumulative, deltas, load, registers_of, t_of

WEEKS = 4
HISTORY = WEEKS * 7 * PER_DAY  # intervals before the billing period
PERIOD = 2 * PER_DAY
START = T0 + timedelta(weeks=WEEKS)
END = START + PERIOD * STEP


def k_of(t: datetime) -> int:
    return (t - T0) // STEP - 1


@pytest.fixture
async def vee(store: ReadingStore, tmp_path: Path) -> AsyncIterator[VeeService]:
    cfg = parse_config({"links": [{"id": "l", "kind": "tcp", "protocol": "dlms-wrapper", "host": "h", "port": 1}],
                        "meters": [{"id": m, "link": "l"} for m in ("CUM", "DEL", "EDIT")]})  # fmt: skip
    versions = VeeStore(tmp_path / "vee.sqlite")
    yield VeeService(store, versions, Registry(cfg), cfg.vee)
    versions.close()


async def test_a_short_gap_is_interpolated_and_adds_up_to_the_register(vee: VeeService) -> None:
    gap = {HISTORY + 40, HISTORY + 41}  # two registers missing: three intervals without a value
    await vee.store.write(cumulative("CUM", HISTORY + PERIOD, change=lambda k, v: None if k in gap else v))
    result = await vee.validate("CUM", START, END)
    by_t = {i.t: i for i in result.intervals}
    estimated = [i for i in result.intervals if i.status == "estimated"]
    assert [k_of(i.t) for i in estimated] == [HISTORY + 40, HISTORY + 41, HISTORY + 42]
    assert all(i.method == "interpolation+scaled" and Quality.ESTIMATED in i.qualities for i in estimated)
    assert all(i.version == 1 and "gap" in i.rules for i in estimated)
    registers = registers_of(HISTORY + PERIOD)
    expected = registers[HISTORY + 43] - registers[HISTORY + 40]  # the register across the gap
    assert sum(i.value or 0 for i in estimated) == pytest.approx(expected)
    assert all(i.status == "actual" and Quality.VALIDATED in i.qualities for t, i in by_t.items() if i not in estimated)
    assert len(result.intervals) == PERIOD
    again = await vee.validate("CUM", START, END)
    assert [i.version for i in again.intervals if i.status == "estimated"] == [1, 1, 1]  # no new version


async def test_a_long_gap_takes_the_like_day_shape_scaled_to_the_register(vee: VeeService) -> None:
    gap = set(range(HISTORY + 20, HISTORY + 44))  # six hours of registers missing
    await vee.store.write(cumulative("CUM", HISTORY + PERIOD, change=lambda k, v: None if k in gap else v))
    result = await vee.validate("CUM", START, END)
    estimated = [i for i in result.intervals if i.status == "estimated"]
    assert len(estimated) == 25 and {i.method for i in estimated} == {"like_day+scaled"}
    registers = registers_of(HISTORY + PERIOD)
    assert sum(i.value or 0 for i in estimated) == pytest.approx(registers[HISTORY + 45] - registers[HISTORY + 20])
    # The like days carry the same shape, so the estimate is the true consumption.
    truth = {t_of(k): registers[k + 1] - registers[k] for k in range(HISTORY + PERIOD)}
    assert all(i.value == pytest.approx(truth[i.t]) for i in estimated)


async def test_interval_data_without_a_register_gets_the_like_day_average(vee: VeeService) -> None:
    gap = set(range(HISTORY + 100, HISTORY + 110))
    await vee.store.write(deltas("DEL", HISTORY + PERIOD, change=lambda k, v: None if k in gap else v))
    result = await vee.validate("DEL", START, END)
    estimated = [i for i in result.intervals if i.status == "estimated"]
    assert [k_of(i.t) for i in estimated] == sorted(gap) and {i.method for i in estimated} == {"like_day"}


async def test_interpolation_is_never_anchored_on_an_outage(vee: VeeService) -> None:
    gap = {HISTORY + 60}
    await vee.store.write(deltas("DEL", HISTORY + PERIOD, change=lambda k, v: None if k in gap else v))
    down, up = t_of(HISTORY + 58) - timedelta(minutes=5), t_of(HISTORY + 59)
    await vee.store.write([Reading("DEL", EVENT_LOG, down, 1.0, kind="event"), Reading("DEL", EVENT_LOG, up, 2.0,
                                                                                      kind="event")])  # fmt: skip
    result = await vee.validate("DEL", START, END)
    (estimated,) = [i for i in result.intervals if i.status == "estimated"]
    assert estimated.method == "like_day"  # the interval before the gap was in an outage


async def test_an_edit_is_a_new_version_and_the_raw_read_stays(vee: VeeService) -> None:
    await vee.store.write(deltas("EDIT", HISTORY + PERIOD, change=lambda k, v: 5.0 if k == HISTORY + 30 else v))
    t = t_of(HISTORY + 30)
    first = {i.t: i for i in (await vee.validate("EDIT", START, END)).intervals}[t]
    assert first.status == "suspect" and first.rules == ("spike",) and first.value == 5.0
    version = await vee.edit("EDIT", t, 0.42, who="billing-clerk", reason="customer reading on site")
    edited = {i.t: i for i in (await vee.validate("EDIT", START, END)).intervals}[t]
    assert (edited.status, edited.value, edited.version) == ("edited", 0.42, version)
    assert Quality.EDITED in edited.qualities and "2.6.1007" in edited.qualities  # and why it was edited
    raw = await vee.store.query("EDIT", IMPORT_INTERVAL, t - STEP, t)
    assert [r.value for r in raw] == [5.0]
    (history,) = vee.versions.versions("EDIT", IMPORT_INTERVAL, t - STEP, t).values()
    assert [(v.status, v.author, v.reason) for v in history] == [
        ("edited", "billing-clerk", "customer reading on site")
    ]
    with pytest.raises(ValueError, match="not an interval end"):
        await vee.edit("EDIT", t + timedelta(minutes=1), 1.0, who="x", reason="typo")


async def test_gaps_are_reread_from_the_meter_before_anything_is_estimated(vee: VeeService) -> None:
    gap = {HISTORY + 10}
    full = cumulative("CUM", HISTORY + PERIOD)
    await vee.store.write([r for r in full if k_of(r.timestamp) not in gap])
    asked: list[tuple[str, datetime, datetime]] = []

    async def reread(meter: str, start: datetime, end: datetime) -> None:
        asked.append((meter, start, end))
        await vee.store.write([r for r in full if k_of(r.timestamp) in gap])  # the meter still had it

    vee.reread = reread
    result = await vee.validate("CUM", START, END)
    missing = t_of(HISTORY + 10)  # the two intervals either side of the missing register
    assert asked == [("CUM", missing - STEP, missing + STEP)] and result.rereads == 1, "only the gap is asked"
    assert {i.status for i in result.intervals} == {"actual"}


async def test_determinants_for_billing(vee: VeeService) -> None:
    gap = {HISTORY + 40}
    await vee.store.write(cumulative("CUM", HISTORY + PERIOD, change=lambda k, v: None if k in gap else v))
    d = await vee.determinants("CUM", START, END)
    registers = registers_of(HISTORY + PERIOD)
    assert d.start_register == pytest.approx(registers[HISTORY]) and d.end_register == pytest.approx(registers[-1])
    assert d.consumption_kwh == pytest.approx(registers[-1] - registers[HISTORY])
    assert d.expected_intervals == PERIOD and d.completeness == pytest.approx((PERIOD - 2) / PERIOD)
    assert d.by_status == {"actual": PERIOD - 2, "estimated": 2}
    assert d.by_quality[Quality.ESTIMATED] == 2 and d.max_demand_kw == pytest.approx(0.5 * 4, rel=0.01)




async def test_consumption_while_the_journal_says_the_relay_is_open_is_flagged(
    vee: VeeService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = CommandJournal(tmp_path / "journal.sqlite")
    opened, closed = START + timedelta(hours=10), START + timedelta(hours=14)
    for action, at in ((RelayAction.DISCONNECT, opened), (RelayAction.RECONNECT, closed)):
        with monkeypatch.context() as clock:  # the journal records this switching at `at`
            clock.setattr(journal_module.time, "time_ns", lambda at=at: to_ns(at))
            command = journal.create("DEL", action, who="op", why=f"{action.value} for the test").command
            journal.transition(command.id, CommandState.QUEUED)
            assert journal.claim(command.id, "runner") is not None
            for state in (CommandState.SENT, CommandState.CONFIRMED):
                journal.transition(command.id, state, owner="runner")
    vee.journal = journal
    await vee.store.write(deltas("DEL", HISTORY + PERIOD))  # the meter kept counting: a bypass?
    result = await vee.validate("DEL", START, END)
    flagged = [i.t for i in result.intervals if "after_disconnect" in i.rules]
    assert flagged == [opened + k * STEP for k in range(1, 17)]  # the four hours the relay was open
    assert all(i.status == "suspect" and "2.6.1010" in i.qualities for i in result.intervals if i.t in flagged)
    journal.close()


def test_a_gap_is_re_read_a_bounded_number_of_times_with_growing_spacing(tmp_path: Path) -> None:
    store = VeeStore(tmp_path / "vee.sqlite")
    gap, other = datetime(2026, 3, 9, 10, 15, tzinfo=UTC), datetime(2026, 3, 9, 12, 0, tzinfo=UTC)
    t0 = datetime(2026, 3, 10, tzinfo=UTC)

    def claim(at: timedelta, gaps: list[datetime]) -> list[datetime]:
        return store.claim_rereads("M1", gaps, t0 + at, attempts=3, spacing=timedelta(minutes=15))

    assert claim(timedelta(0), [gap]) == [gap]
    assert claim(timedelta(minutes=14), [gap, other]) == [other], "the second try waits its spacing"
    assert claim(timedelta(minutes=15), [gap]) == [gap]
    assert claim(timedelta(minutes=44), [gap]) == [], "then twice the spacing"
    assert claim(timedelta(minutes=45), [gap]) == [gap]
    assert claim(timedelta(days=30), [gap]) == [], "never more than the attempts"
    store.close()
    reopened = VeeStore(tmp_path / "vee.sqlite")
    assert reopened.rereads("M1") == {gap: 3, other: 1}, "kept across a restart"
    reopened.close()


async def test_a_period_shorter_than_one_interval_has_no_intervals(vee: VeeService) -> None:
    await vee.store.write(deltas("DEL", HISTORY + PERIOD))
    within = START + timedelta(minutes=1)  # both ends round up to the same interval end
    result = await vee.validate("DEL", within, within + timedelta(minutes=4))
    assert result.intervals == []
    assert (await vee.determinants("DEL", within, within + timedelta(minutes=4))).expected_intervals == 0


async def test_a_value_near_the_limit_of_a_float_is_served_as_read(vee: VeeService) -> None:
    huge = 1e306  # absurd for a meter, but a finite number the store keeps: never turned into inf
    await vee.store.write(deltas("DEL", HISTORY + PERIOD, change=lambda k, v: huge if k == HISTORY + 5 else v))
    by_t = {i.t: i for i in (await vee.validate("DEL", START, END)).intervals}
    assert by_t[t_of(HISTORY + 5)].value == huge
    assert by_t[t_of(HISTORY + 6)].value == load(HISTORY + 6)  # and the others as they were read
