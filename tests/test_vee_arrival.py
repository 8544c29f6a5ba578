"""VEE on arrival, through the real outbox and writer: a value that replaces a different one
is kept as a doubt (duplicate rule), and what arrives is validated as it is stored."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from headend.config import parse_config
from headend.model import IMPORT_INTERVAL, Reading
from headend.registry import Registry
from headend.storage.outbox import Outbox
from headend.storage.sqlite import SqliteStore
from headend.storage.writer import BatchWriter
from headend.vee.arrival import ArrivalValidator
from headend.vee.service import VeeService
from headend.vee.store import VeeStore
from tests.vee_data import PER_DAY, STEP, T0, cumulative, deltas, t_of


@dataclasses.dataclass
class Site:
    outbox: Outbox
    writer: BatchWriter
    arrival: ArrivalValidator
    vee: VeeService

    async def deliver(self, readings: list[Reading]) -> None:
        await self.outbox.accept(readings)
        while self.outbox.depth():
            batch = await self.outbox.take(10_000)
            await self.writer._write(batch)  # one writer step, without the background loop
        await self.arrival.drain()


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    cfg = parse_config({"links": [{"id": "l", "kind": "tcp", "protocol": "dlms-wrapper", "host": "h", "port": 1}],
                        "meters": [{"id": "A", "link": "l"}, {"id": "B", "link": "l"}]})  # fmt: skip
    store = SqliteStore(tmp_path / "readings.sqlite")
    await store.open()
    versions = VeeStore(tmp_path / "vee.sqlite")
    vee = VeeService(store, versions, Registry(cfg), cfg.vee)
    arrival = ArrivalValidator(vee)
    outbox = Outbox(tmp_path / "outbox.sqlite")
    writer = BatchWriter(outbox, store, before_write=arrival.before_write, after_write=arrival.after_write)
    yield Site(outbox, writer, arrival, vee)
    outbox.close()
    versions.close()
    await store.close()


async def test_a_replaced_value_stays_a_doubt(site: Site) -> None:
    first = deltas("A", PER_DAY)
    await site.deliver(first)
    assert site.arrival.conflicts == 0 and site.arrival.validated == 1
    # The concentrator sent interval 40 again, with a different value.
    changed = dataclasses.replace(first[40], value=(first[40].value or 0) + 0.05)
    await site.deliver([changed, first[41]])  # and 41 the same as before: harmless
    assert site.arrival.conflicts == 1
    result = await site.vee.validate("A", T0, T0 + PER_DAY * STEP)
    flagged = {i.t: i for i in result.intervals if i.rules}
    assert list(flagged) == [t_of(40)] and flagged[t_of(40)].rules == ("duplicate",)
    assert flagged[t_of(40)].status == "estimated"  # two answers: neither is billed as read


async def test_a_replaced_register_doubts_both_intervals_it_bounds(site: Site) -> None:
    first = cumulative("B", PER_DAY)
    await site.deliver(first)
    await site.deliver([dataclasses.replace(first[21], value=(first[21].value or 0) + 3.0)])  # register at t_of(20)
    result = await site.vee.validate("B", T0, T0 + PER_DAY * STEP)
    assert [i.t for i in result.intervals if "duplicate" in i.rules] == [t_of(20), t_of(21)]


async def test_what_arrives_is_validated_and_failures_counted(site: Site) -> None:
    await site.deliver(deltas("A", PER_DAY, change=lambda k, v: None if k in (5, 6) else v))
    await site.deliver(deltas("B", PER_DAY, change=lambda k, v: -1.0 if k == 9 else v))
    assert site.arrival.validated == 2
    assert site.arrival.failing() == {"gap": 2, "negative_delta": 1}
    versions = site.vee.versions.versions("A", IMPORT_INTERVAL, T0, T0 + PER_DAY * STEP)
    assert sorted(versions) == [t_of(5), t_of(6)]  # the estimates are already versions


async def test_live_data_costs_no_lookup_and_a_day_is_validated_once_it_has_closed(site: Site) -> None:
    """Values newer than anything stored cannot replace one: no query for them. A meter-day
    is validated when it closes, not at each batch, and again when a late value touches it."""
    clock = {"now": T0 + timedelta(hours=12)}
    site.arrival.now = lambda: clock["now"]
    readings = deltas("A", 2 * PER_DAY)
    await site.deliver(readings[: PER_DAY // 2])  # the morning, while the day is open
    assert site.arrival.validated == 0 and site.arrival.lookups == 1  # the one look at what is stored
    clock["now"] = T0 + timedelta(days=1, hours=12)
    await site.deliver(readings[PER_DAY // 2 :])  # the rest of the day and the next morning
    assert site.arrival.lookups == 1, "newer than anything stored: nothing looked up"
    assert site.arrival.validated == 1, "the closed day validated once; the open one waits"
    late = dataclasses.replace(readings[10], value=readings[10].value + 1.0)  # type: ignore[operator]
    await site.deliver([late])
    assert site.arrival.lookups == 2 and site.arrival.conflicts == 1 and site.arrival.validated == 2
