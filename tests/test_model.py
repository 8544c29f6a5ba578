"""OBIS codes and readings: what parses, what is refused, and why."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from headend.model import InvalidReading, Obis, Quality, Reading, validate_meter_id

T = datetime(2026, 3, 1, 12, 15, tzinfo=UTC)
IMPORT = Obis(1, 0, 1, 8, 0, 255)


@pytest.mark.parametrize(
    ("text", "obis"),
    [
        ("1-0:1.8.0.255", Obis(1, 0, 1, 8, 0, 255)),
        ("1-0:1.8.0", Obis(1, 0, 1, 8, 0, 255)),
        ("0-0:96.3.10.255", Obis(0, 0, 96, 3, 10, 255)),
        (" 1-0:99.1.0.255 ", Obis(1, 0, 99, 1, 0, 255)),
    ],
)
def test_obis_parses_and_formats(text: str, obis: Obis) -> None:
    assert Obis.parse(text) == obis
    assert Obis.parse(str(obis)) == obis
    assert Obis.from_bytes(obis.to_bytes()) == obis


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("1.8.0", "not an OBIS code"),
        ("1-0:1.8", "not an OBIS code"),
        ("1-0:1.8.0.256", "group F is 256"),
        ("1-0:1.8.x.255", "not an OBIS code"),
        ("", "not an OBIS code"),
        ("1-0:1.8.0.255.1", "not an OBIS code"),
    ],
)
def test_obis_rejects_garbage_clearly(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        Obis.parse(text)


def test_obis_from_wrong_length_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="6 bytes, got 5: 0100010800"):
        Obis.from_bytes(bytes([1, 0, 1, 8, 0]))


def test_from_raw_applies_scaler_and_multiplier_and_keeps_raw() -> None:
    r = Reading.from_raw("M1", IMPORT, T, 12345, scaler=-3, multiplier=40.0, unit="kWh")
    assert r.value == 12.345 * 40
    assert (r.raw, r.scaler, r.multiplier) == (12345.0, -3, 40.0)
    assert Reading.from_raw("M1", IMPORT, T, 12345, scaler=-3).value == 12.345
    assert Reading.from_raw("M1", IMPORT, T, 7, scaler=2).value == 700.0


def test_timestamps_are_normalised_to_utc() -> None:
    cet = timezone(timedelta(hours=1))
    r = Reading(meter="M1", channel=IMPORT, timestamp=datetime(2026, 3, 1, 13, 15, tzinfo=cet), value=1.0)
    assert r.timestamp == T and r.timestamp.tzinfo is UTC


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"timestamp": datetime(2026, 3, 1)}, "has no timezone"),
        ({"value": float("nan")}, "value of M1 .* is nan"),
        ({"raw": float("inf")}, "raw of M1 .* is inf"),
        ({"value": "12"}, "value must be a number"),
        ({"value": None}, "not marked missing"),
        ({"multiplier": 0}, "multiplier must be positive"),
        ({"scaler": 300}, "scaler must be an integer"),
        ({"qualities": ("valid",)}, "not an IEC 61968-9 quality code"),
        ({"meter": "M\n1"}, "control character U\\+000A"),
        ({"meter": "M\\1"}, "backslash"),
        ({"meter": " "}, "empty or blank"),
        ({"kind": "gauge"}, "kind must be one of"),
        ({"unit": "kW\th"}, "unit must be a string without control characters"),
    ],
)
def test_invalid_readings_are_refused_with_the_field_and_reason(kwargs: dict[str, object], reason: str) -> None:
    fields: dict[str, object] = {"meter": "M1", "channel": IMPORT, "timestamp": T, "value": 1.0, **kwargs}
    with pytest.raises(InvalidReading, match=reason):
        Reading(**fields)  # type: ignore[arg-type]


def test_a_gap_is_a_reading_without_value_marked_missing() -> None:
    gap = Reading(meter="M1", channel=IMPORT, timestamp=T, value=None, qualities=(Quality.MISSING,))
    assert gap.value is None
    assert gap.identity == ("interval", "M1", "1-0:1.8.0.255", T)


@pytest.mark.parametrize("meter", ["with space", "comma,here", 'quote"d', "équipe 電表", "x" * 64])
def test_awkward_meter_ids_are_allowed(meter: str) -> None:
    assert validate_meter_id(meter) == meter


def test_overlong_meter_id_is_refused() -> None:
    with pytest.raises(ValueError, match="longer than 64"):
        validate_meter_id("x" * 65)


@settings(max_examples=300, deadline=None)
@given(
    raw=st.one_of(st.integers(-(2**63), 2**64), st.floats(allow_nan=False, allow_infinity=False, width=32)),
    scaler=st.integers(-128, 127),
    multiplier=st.sampled_from([1.0, 40.0, 0.5, 2000.0]),
    status=st.sampled_from([(), ("1.0.32",), ("1.0.128",)]),
)
def test_another_value_like_a_checked_reading_is_the_reading_from_raw_would_make(
    raw: float, scaler: int, multiplier: float, status: tuple[str, ...]
) -> None:
    """A profile's values are made from a per-column template; they must be exactly the
    readings `from_raw` makes, and refuse what it refuses."""
    template = Reading.from_raw("M1", IMPORT, T, 0, scaler=scaler, multiplier=multiplier, unit="kWh",
                                source="dlms", kind="interval")  # fmt: skip
    later = T + timedelta(minutes=15)
    try:
        expected = Reading.from_raw("M1", IMPORT, later, raw, scaler=scaler, multiplier=multiplier, unit="kWh",
                                    source="dlms", kind="interval", qualities=status,
                                    collected_at=template.collected_at)  # fmt: skip
    except (InvalidReading, OverflowError):
        with pytest.raises((InvalidReading, OverflowError)):
            template.like(later, raw, status)
        return
    assert template.like(later, raw, status) == expected


def test_another_value_like_a_reading_refuses_what_is_not_a_number() -> None:
    template = Reading.from_raw("M1", IMPORT, T, 0, unit="kWh")
    for bad in (True, "12", None, float("nan"), float("inf")):
        with pytest.raises(InvalidReading):
            template.like(T, bad, ())  # type: ignore[arg-type]
