"""A-XDR and xDLMS parsing: round trips, and no input can hang or crash the parser."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from headend.model import Obis
from headend.protocols.dlms import axdr, xdlms
from headend.protocols.dlms.axdr import AxdrError, DateTime, Structure, Typed


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (True, True),
        (Typed(axdr.UNSIGNED, 200), 200),
        (Typed(axdr.LONG, -300), -300),
        (Typed(axdr.DOUBLE_LONG_UNSIGNED, 4_000_000_000), 4_000_000_000),
        (Typed(axdr.LONG64_UNSIGNED, 2**63 + 5), 2**63 + 5),
        (Typed(axdr.ENUM, 30), 30),
        (b"\x01\x00\x01\x08\x00\xff", b"\x01\x00\x01\x08\x00\xff"),
        ("SIM00000001", "SIM00000001"),
        ([Structure([Typed(axdr.INTEGER, -3), Typed(axdr.ENUM, 30)])] * 3, [Structure([-3, 30])] * 3),
        ([b"x" * 300], [b"x" * 300]),
    ],
)
def test_values_round_trip(value: object, expected: object) -> None:
    decoded = axdr.decode(axdr.encode(value))
    assert decoded == expected
    assert type(decoded) is type(expected)


def test_scaler_unit_decodes_to_a_structure_of_ints() -> None:
    assert axdr.decode(bytes.fromhex("0202 0ffd 161e".replace(" ", ""))) == Structure([-3, 30])


def test_cosem_date_time_with_deviation_is_converted_to_utc() -> None:
    cet = DateTime.from_datetime(datetime(2026, 1, 15, 13, 0, tzinfo=timezone(timedelta(hours=1))))
    assert cet.deviation == -60
    assert DateTime.from_bytes(cet.to_bytes()).to_utc() == datetime(2026, 1, 15, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\x0f", "truncated"),  # the input that makes dlms-cosem's decoder loop forever
        (b"\x01\x05\x11\x01", "array of 5 elements in 2 bytes"),
        (b"\x09\x82\xff", "truncated"),
        (b"\x09\x85\x00\x00\x00\x00\x01", "bad length prefix"),
        (b"\x42", "unknown A-XDR tag 0x42"),
        (b"\x11\x01\x00", "1 bytes left after the value"),
        (b"\x19" + b"\xff" * 12, "unspecified fields"),
        (b"\x02\x01" * 20 + b"\x00", "nested deeper than 16"),
    ],
)
def test_bad_input_raises_a_clear_error(raw: bytes, reason: str) -> None:
    with pytest.raises(AxdrError, match=reason):
        axdr.decode(raw)


@settings(derandomize=True, max_examples=2000, deadline=200)
@given(st.binary(max_size=64))
def test_random_bytes_never_hang_the_decoder(raw: bytes) -> None:
    with contextlib.suppress(AxdrError):
        axdr.decode(raw)


@settings(derandomize=True, max_examples=500, deadline=200)
@given(st.binary(max_size=200), st.integers(min_value=1, max_value=200))
def test_truncated_responses_are_refused_not_hung(tail: bytes, cut: int) -> None:
    good = xdlms.GetResult(0xC1, data=axdr.encode([Structure([Typed(axdr.DOUBLE_LONG_UNSIGNED, 7), b"x" * 20])] * 4))
    raw = good.to_bytes()
    for candidate in (raw[: max(0, len(raw) - cut)], bytes([0xC4]) + tail, raw[:3] + tail):
        with contextlib.suppress(xdlms.XdlmsError, AxdrError):
            xdlms.parse_response(candidate)


def test_get_request_round_trips_with_selective_access() -> None:
    request = xdlms.GetRequest(0xC1, xdlms.Attribute(7, Obis(1, 0, 99, 1, 0), 2), 1, b"\x02\x00")
    assert xdlms.parse_request(request.to_bytes()) == request
