"""The contract every ReadingStore keeps; run against SqliteStore and a real InfluxDB."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from headend.model import Obis, Quality, Reading
from headend.storage.base import ReadingStore
from tests.factories import IMPORT, PROFILE_STEP, T0, intervals

EXPORT = Obis.parse("1-0:2.8.0.255")
DAY = timedelta(days=1)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


async def test_written_readings_come_back_with_every_field(store: ReadingStore) -> None:
    batch = list(intervals(1, 0, 96))
    await store.write(batch)
    assert await store.query("M001", IMPORT, T0, T0 + DAY) == batch


async def test_rewriting_the_same_identity_keeps_one_point(store: ReadingStore) -> None:
    batch = list(intervals(1, 0, 10))
    await store.write(batch)
    await store.write(batch)
    await store.write(batch[3:7])
    assert await store.query("M001", IMPORT, T0, T0 + DAY) == batch
    assert await store.count() == 10


async def test_range_is_interval_ending_start_exclusive_end_inclusive(store: ReadingStore) -> None:
    await store.write(list(intervals(1, 0, 96 * 2)))
    day_one = await store.query("M001", IMPORT, T0, T0 + DAY)
    assert len(day_one) == 96
    assert day_one[0].timestamp == T0 + PROFILE_STEP
    assert day_one[-1].timestamp == T0 + DAY


async def test_meters_channels_and_kinds_are_kept_apart(store: ReadingStore) -> None:
    imports = list(intervals(1, 0, 4))
    exports = list(intervals(1, 0, 4, channel=EXPORT))
    other = list(intervals(2, 0, 4))
    register = Reading(meter="M001", channel=IMPORT, timestamp=T0 + DAY / 2, value=42.0, kind="register", unit="kWh")
    await store.write([*imports, *exports, *other, register])
    assert await store.query("M001", IMPORT, T0, T0 + DAY) == imports
    assert await store.query("M001", EXPORT, T0, T0 + DAY) == exports
    assert await store.query("M002", IMPORT, T0, T0 + DAY) == other
    assert await store.query("M001", IMPORT, T0, T0 + DAY, kind="register") == [register]
    assert await store.query("M003", IMPORT, T0, T0 + DAY) == []


async def test_last_interval_is_the_newest_stored_interval(store: ReadingStore) -> None:
    assert await store.last_interval("M001", IMPORT) is None
    await store.write(list(intervals(1, 10, 20)))
    await store.write(list(intervals(1, 0, 5)))
    assert await store.last_interval("M001", IMPORT) == T0 + 20 * PROFILE_STEP
    assert await store.last_interval("M001", EXPORT) is None


async def test_a_marked_gap_is_stored_without_a_value(store: ReadingStore) -> None:
    gap = Reading(meter="M001", channel=IMPORT, timestamp=T0 + PROFILE_STEP, value=None, qualities=(Quality.MISSING,))
    await store.write([gap])
    assert await store.query("M001", IMPORT, T0, T0 + DAY) == [gap]
    assert await store.last_interval("M001", IMPORT) == gap.timestamp


async def test_awkward_text_round_trips(store: ReadingStore) -> None:
    ids = ["with space", "comma,here", 'double"quote', "single'quote", "eq=sign", "équipe ünï 電表", "plug🔌"]
    batch = [
        Reading(
            meter=m,
            channel=IMPORT,
            timestamp=T0 + PROFILE_STEP,
            value=-0.0 if i == 0 else 1e300 / (i + 1),
            unit='k"W,h =',
            source="mqtt/concentrator 'north', bay=3",
            qualities=("1.4.9", "2.0.1"),
        )
        for i, m in enumerate(ids)
    ]
    await store.write(batch)
    for reading in batch:
        assert await store.query(reading.meter, IMPORT, T0, T0 + DAY) == [reading]


async def test_the_newest_interval_of_every_meter_comes_in_one_request(store: ReadingStore) -> None:
    register = Reading(meter="M003", channel=IMPORT, timestamp=T0 + DAY, value=42.0, kind="register", unit="kWh")
    await store.write([*intervals(1, 0, 20), *intervals(1, 0, 7, channel=EXPORT), *intervals(2, 3, 5), register])
    latest = await store.latest_intervals([IMPORT, EXPORT])
    assert latest == {("M001", IMPORT): T0 + 20 * PROFILE_STEP, ("M001", EXPORT): T0 + 7 * PROFILE_STEP,
                      ("M002", IMPORT): T0 + 5 * PROFILE_STEP}  # fmt: skip
    assert await store.latest_intervals([EXPORT]) == {("M001", EXPORT): T0 + 7 * PROFILE_STEP}


async def test_interval_times_are_the_intervals_with_a_value_per_meter(store: ReadingStore) -> None:
    gap = Reading(meter="M002", channel=IMPORT, timestamp=T0 + 2 * PROFILE_STEP, value=None,
                  qualities=(Quality.MISSING,))  # fmt: skip
    await store.write([*intervals(1, 0, 96 * 2), *intervals(2, 0, 1), gap, *intervals(3, 0, 4, channel=EXPORT)])
    times = await store.interval_times(["M001", "M002", "M003", "M004"], IMPORT, T0, T0 + DAY)
    assert times == {"M001": {T0 + (i + 1) * PROFILE_STEP for i in range(96)}, "M002": {T0 + PROFILE_STEP},
                     "M003": set(), "M004": set()}  # fmt: skip


async def test_a_point_written_again_keeps_nothing_of_the_first(store: ReadingStore) -> None:
    """A re-read after the CT ratio was corrected: the multiplier, unit and source of the
    second write are what is stored, not a mix (InfluxDB merges a point's fields)."""
    t = T0 + PROFILE_STEP
    first = Reading(meter="M001", channel=IMPORT, timestamp=t, value=493.8, raw=12345, scaler=-3, multiplier=40.0,
                    unit="kWh", source="dlms/a", qualities=("2.0.1",))  # fmt: skip
    second = Reading(meter="M001", channel=IMPORT, timestamp=t, value=12.345, raw=12345, scaler=-3, multiplier=1.0,
                     unit="", source="", collected_at=first.collected_at)  # fmt: skip
    await store.write([first])
    await store.write([second])
    assert await store.query("M001", IMPORT, T0, T0 + DAY) == [second]


async def test_columns_are_the_readings_a_query_gives(store: ReadingStore) -> None:
    batch = list(intervals(1, 0, 96))
    batch[5] = Reading(meter="M001", channel=IMPORT, timestamp=batch[5].timestamp, value=None,
                       qualities=(Quality.MISSING,))  # fmt: skip
    batch[7] = Reading(meter="M001", channel=IMPORT, timestamp=batch[7].timestamp, value=1.5, multiplier=40.0,
                       qualities=("1.0.32", "2.6.16"))  # fmt: skip
    await store.write(batch)
    await store.write(list(intervals(2, 0, 96)))  # another meter's, not in the answer
    columns = await store.query_columns("M001", IMPORT, T0, T0 + DAY)
    readings = await store.query("M001", IMPORT, T0, T0 + DAY)
    assert [int(t) for t in columns.ts] == [int((r.timestamp - EPOCH) / timedelta(microseconds=1)) * 1000
                                            for r in readings]  # fmt: skip
    assert [None if v != v else v for v in columns.value.tolist()] == [r.value for r in readings]
    assert columns.multiplier.tolist() == [r.multiplier for r in readings]
    assert columns.quality.tolist() == [",".join(r.qualities) for r in readings]
    assert len(await store.query_columns("M003", IMPORT, T0, T0 + DAY)) == 0
