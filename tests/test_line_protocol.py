"""The head-end's own line protocol against influxdb-client's `Point` (an independent
implementation, the one the head-end used before): the same text for any reading a meter
or concentrator can produce, escaping included."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st
from influxdb_client.client.write.point import Point
from influxdb_client.domain.write_precision import WritePrecision

from headend.model import InvalidReading, Obis, Reading
from headend.storage import series
from headend.storage.codec import to_ns
from headend.storage.influx import series_lines, to_line

names = st.text(st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="\\"), min_size=1, max_size=12)
texts = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=12)
numbers = st.one_of(st.floats(allow_nan=False, allow_infinity=False, width=64), st.integers(-(10**12), 10**12))
def reading(**fields: object) -> Reading | None:
    """A reading the head-end would accept, or None (hypothesis draws some it refuses)."""
    if fields["value"] is None:
        fields["qualities"] = (*fields["qualities"], "2.5.259")  # type: ignore[misc]
    try:
        return Reading(**fields)  # type: ignore[arg-type]
    except InvalidReading:
        return None


readings = st.builds(
    reading,
    meter=names,
    channel=st.sampled_from([Obis(1, 0, 1, 8, 0), Obis(1, 0, 1, 29, 0), Obis(0, 0, 99, 98, 0)]),
    timestamp=st.datetimes(datetime(1990, 1, 1), datetime(2100, 1, 1), timezones=st.just(UTC)),
    value=st.one_of(st.none(), numbers),
    unit=texts,
    kind=st.sampled_from(["interval", "register", "event"]),
    raw=st.one_of(st.none(), numbers),
    scaler=st.integers(-128, 127),
    multiplier=st.one_of(st.floats(min_value=1e-6, max_value=1e6), st.integers(1, 10_000)),
    qualities=st.lists(st.sampled_from(["2.0.1", "1.0.32", "2.5.259", "2.4.128"]), max_size=3).map(tuple),
    source=texts,
    collected_at=st.datetimes(datetime(1990, 1, 1), datetime(2100, 1, 1), timezones=st.just(UTC)),
).filter(lambda r: r is not None)


def point_line(r: Reading) -> str:
    point = (
        Point(r.kind).tag("meter", r.meter).tag("channel", str(r.channel)).field("value", r.value)
        .field("raw", r.raw).field("scaler", r.scaler).field("multiplier", r.multiplier).field("unit", r.unit)
        .field("quality", ",".join(r.qualities)).field("source", r.source)
        .field("collected_at", to_ns(r.collected_at)).time(to_ns(r.timestamp), WritePrecision.NS)
    )  # fmt: skip
    return point.to_line_protocol()


@settings(max_examples=500, deadline=None, derandomize=True)
@given(reading=readings)
def test_our_line_protocol_is_influxdb_clients(reading: Reading) -> None:
    assert to_line(reading) == point_line(reading)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(batch=st.lists(readings, max_size=30))
def test_a_series_is_written_point_for_point_as_its_readings(batch: list[Reading]) -> None:
    """Readings grouped into series (as the outbox keeps them) and back: the same points,
    the same line protocol, the same readings after the outbox's encoding."""
    grouped = series.of_readings(batch)
    assert sorted(line for s in grouped for line in series_lines(s)) == sorted(point_line(r) for r in batch)
    again = [series.decode(s.encode()) for s in grouped]
    assert Counter(series.readings_of(again)) == Counter(batch)


def test_the_escapes_a_meter_id_and_a_source_need() -> None:
    r = Reading('M 1,"a"=b', Obis(1, 0, 1, 8, 0), datetime(2026, 3, 9, tzinfo=UTC) + timedelta(minutes=15), 1.5,
                unit="kWh", source='dc "north" \\ 1', qualities=("2.0.1",))  # fmt: skip
    line = to_line(r)
    assert line.startswith('interval,channel=1-0:1.8.0.255,meter=M\\ 1\\,"a"\\=b ')
    assert 'source="dc \\"north\\" \\\\ 1"' in line and line == point_line(r)
