"""The lean data-message decoder (msgspec, straight into series) against the documented
pydantic schema and the Reading checks it replaces on the hot path: whatever the lean one
accepts, the schema accepts too, as the same readings; what the schema refuses, the lean one
refuses. Hypothesis draws well-formed messages and messages broken in every field."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from headend.model import InvalidReading, Obis, Reading
from headend.protocols import mqtt_data
from headend.protocols.mqtt import ConcentratorLink, point_reading
from headend.protocols.mqtt_schema import ROOT, Data
from headend.storage.codec import from_ns
from headend.storage.outbox import Outbox
from headend.storage.series import Series

SOURCE = "mqtt/dc-1"
good_times = st.sampled_from([
    "2026-03-09T10:15:00Z", "2026-03-09T10:30:00+01:00", "2026-03-09T10:45:00.123456-05:30",
    "1970-01-01T00:00:00Z", "2199-12-31T23:59:59Z"])  # fmt: skip
bad_times = st.sampled_from(["2026-03-09T10:15:00", "yesterday", "", "9999-12-31T23:59:00-23:59",
                             "1969-12-31T23:59:59Z", "2200-01-01T00:00:01Z", 1773051300, None])  # fmt: skip
numbers = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-(10**15), 10**15))
odd = st.one_of(st.text(max_size=3), st.booleans(), st.lists(st.integers(), max_size=2), st.just({}),
                st.integers(-(10**30), 10**30), st.just(1e308))  # fmt: skip
qualities = st.lists(st.sampled_from(["2.0.1", "1.0.32", "2.5.259", "2.4.128", "bad", "1.2.3.4", "x" * 20]),
                     max_size=9)  # fmt: skip


def mark_gap(point: dict[str, Any]) -> dict[str, Any]:
    """A gap marked missing, as it must be (one with quality 1.0.32 is left unmarked: refused)."""
    q = point.get("q", [])
    if point["v"] is None and "1.0.32" not in q and "2.5.259" not in q:
        return {**point, "q": [*q[:7], "2.5.259"]}
    return point


points = st.fixed_dictionaries(
    {"t": good_times, "v": st.one_of(st.none(), numbers)},
    optional={"q": qualities.filter(lambda q: all(c[0] in "12" and len(c) < 8 for c in q)),
              "raw": st.one_of(st.none(), numbers), "scaler": st.integers(-128, 127)},
).map(lambda p: mark_gap(p))  # fmt: skip
blocks = st.fixed_dictionaries(
    {"meter": st.sampled_from(["M1", "M 2,\"x\"", "電表"]), "kind": st.sampled_from(["interval", "register", "event"]),
     "channel": st.sampled_from(["1-0:1.29.0.255", "1-0:1.8.0", "0-0:99.98.0.255"]),
     "readings": st.lists(points, min_size=1, max_size=4)},
    optional={"unit": st.sampled_from(["kWh", "", "k\"W h"]), "interval_s": st.sampled_from([900, None])},
)  # fmt: skip
valid = st.fixed_dictionaries({"seq": st.integers(0, 2**53 - 1), "blocks": st.lists(blocks, min_size=1, max_size=3)},
                              optional={"replay": st.booleans()})  # fmt: skip
#: What can be wrong, where: (level, key, bad values).
BREAKS: list[tuple[str, str, st.SearchStrategy[Any]]] = [
    ("message", "seq", st.sampled_from([-1, 2**53, "7", 1.5, None])),
    ("message", "blocks", st.sampled_from([[], None, "x"])),
    ("message", "replay", st.sampled_from(["yes", 1])),
    ("message", "other", st.just(0)),
    ("block", "meter", st.sampled_from(["", "a\\b", "x" * 65, "a\x01", 7])),
    ("block", "kind", st.sampled_from(["other", None])),
    ("block", "channel", st.sampled_from(["not-obis", "1-0:1.8.0.256", "", 3])),
    ("block", "unit", st.sampled_from(["x" * 17, "k\x07", None])),
    ("block", "interval_s", st.sampled_from([0, -5, "900", 1.5])),
    ("block", "readings", st.sampled_from([[], None])),
    ("point", "t", bad_times),
    ("point", "v", odd),
    ("point", "raw", odd),
    ("point", "q", st.one_of(qualities, odd)),
    ("point", "scaler", st.one_of(st.integers(-1000, 1000), odd, st.just(2.0))),
    ("point", "extra", st.just(1)),
]


@st.composite
def messages(draw: st.DrawFn) -> dict[str, Any]:
    """A well-formed message, or one with one thing wrong in it (most of the time)."""
    message = draw(valid)
    if draw(st.integers(0, 3)) == 0:
        return message
    level, key, bad = draw(st.sampled_from(BREAKS))
    block = draw(st.sampled_from(message["blocks"]))
    target = {"message": message, "block": block, "point": draw(st.sampled_from(block["readings"]))}[level]
    target[key] = draw(bad)
    return message


def series_of(block: mqtt_data.DataBlock, multiplier: float, source: str, collected_ns: int) -> Series:
    """One block as the link makes it a series."""
    builder = mqtt_data.SeriesBuilder(collected_ns)
    builder.add([mqtt_data.part_of(block, multiplier)], source)
    (s,) = builder.series()
    return s


def schema_readings(payload: bytes, multiplier: float) -> list[Reading] | None:
    try:
        data = Data.model_validate_json(payload)
        return [point_reading(b.meter, b.channel, b.kind, b.unit, p, multiplier, SOURCE)
                for b in data.blocks for p in b.readings]  # fmt: skip
    except (ValidationError, ValueError, InvalidReading):
        return None


def lean_readings(payload: bytes, multiplier: float) -> list[Reading] | None:
    try:
        data = mqtt_data.decode(payload)
        series = [series_of(b, multiplier, SOURCE, 0) for b in data.blocks]
    except ValueError:
        return None
    return [r for s in series for r in s.readings()]


def same(a: list[Reading], b: list[Reading]) -> bool:
    return [dataclasses.replace(r, collected_at=from_ns(0)) for r in a] == b


@settings(max_examples=600, deadline=None, derandomize=True)
@given(message=messages(), multiplier=st.sampled_from([1.0, 40.0, 0.1]))
def test_the_lean_decoder_accepts_only_what_the_schema_accepts_as_the_same_readings(
    message: dict[str, Any], multiplier: float
) -> None:
    payload = json.dumps(message).encode()
    lean = lean_readings(payload, multiplier)
    schema = schema_readings(payload, multiplier)
    if lean is not None:
        assert schema is not None, "accepted by the lean decoder, refused by the schema"
        assert same(schema, lean)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(message=valid, multiplier=st.sampled_from([1.0, 40.0]))
def test_a_well_formed_message_is_the_same_readings_both_ways(message: dict[str, Any], multiplier: float) -> None:
    """The lean decoder is stricter only about JSON types (a number as a string, a time as a
    number): a message the simulator or a concentrator following docs/mqtt.md sends passes."""
    payload = json.dumps(message).encode()
    lean, schema = lean_readings(payload, multiplier), schema_readings(payload, multiplier)
    assert (lean is None) == (schema is None)  # both refuse a gap without its quality
    if lean is not None and schema is not None:
        assert same(schema, lean)


def test_a_message_past_the_point_limit_is_refused() -> None:
    point = {"t": "2026-03-09T10:15:00Z", "v": 1.0}
    block = {"meter": "M1", "kind": "interval", "channel": "1-0:1.29.0.255", "readings": [point] * 10_000}
    with pytest.raises(ValueError, match="at most 100000"):
        mqtt_data.decode(json.dumps({"seq": 1, "blocks": [block] * 11}).encode())


def test_a_block_becomes_one_series_with_the_multiplier_applied_exactly() -> None:
    block = {"meter": "M1", "kind": "interval", "channel": "1-0:1.29.0.255", "unit": "kWh",
             "readings": [{"t": "2026-03-09T10:15:00+01:00", "v": 12.345, "raw": 12345, "scaler": -3},
                          {"t": "2026-03-09T09:30:00Z", "v": None, "q": ["2.5.259"]}]}  # fmt: skip
    (b,) = mqtt_data.decode(json.dumps({"seq": 3, "blocks": [block]}).encode()).blocks
    s = series_of(b, 40.0, SOURCE, 0)
    assert (s.meter, s.channel, s.unit, s.multiplier, len(s)) == ("M1", Obis(1, 0, 1, 29, 0), "kWh", 40.0, 2)
    assert s.values == [493.8, None] and s.raws == [12345.0, None] and s.qualities == ["", "2.5.259"]
    assert [from_ns(t).isoformat() for t in s.times] == ["2026-03-09T09:15:00+00:00", "2026-03-09T09:30:00+00:00"]


def test_a_value_sent_again_in_one_batch_is_stored_as_sent_last() -> None:
    """Three messages of one batch carry the same interval: in kWh, in Wh, in kWh again (or
    through two concentrators). The series keep the order of arrival, so what was sent last
    is written last."""
    builder = mqtt_data.SeriesBuilder(0)
    for value, unit, source in ((1.0, "kWh", SOURCE), (2000.0, "Wh", SOURCE), (3.0, "kWh", "mqtt/dc-2")):
        block = {"meter": "M1", "kind": "interval", "channel": "1-0:1.29.0.255", "unit": unit,
                 "readings": [{"t": "2026-03-09T10:15:00Z", "v": value}]}  # fmt: skip
        (b,) = mqtt_data.decode(json.dumps({"seq": 1, "blocks": [block]}).encode()).blocks
        builder.add([mqtt_data.part_of(b, 1.0)], source)
    assert [(s.values, s.unit, s.source) for s in builder.series()] == [
        ([1.0], "kWh", SOURCE), ([2000.0], "Wh", SOURCE), ([3.0], "kWh", "mqtt/dc-2")]


@pytest.mark.parametrize("t", ["2026-03-09T10:14:59.9999995Z", "2026-03-09T23:59:59.9999999+00:00"])
def test_a_time_past_microseconds_is_refused_by_both_decoders(t: str) -> None:
    """msgspec would round it, pydantic truncate: the same interval as two points."""
    block = {"meter": "M1", "kind": "interval", "channel": "1-0:1.29.0.255", "readings": [{"t": t, "v": 1.0}]}
    payload = json.dumps({"seq": 1, "blocks": [block]}).encode()
    assert lean_readings(payload, 1.0) is None and schema_readings(payload, 1.0) is None


@given(st.lists(st.sampled_from(["1", "23", ":", ".", "4567", '"', "T", "00:00:00.1234567", ":59.9999999"]),
                max_size=12).map("".join))
@settings(max_examples=500)
def test_the_fast_search_for_sub_microsecond_times_finds_what_the_whole_pattern_finds(text: str) -> None:
    payload = text.encode()
    assert mqtt_data._sub_microsecond(payload) == bool(mqtt_data._SUB_MICROSECOND.search(payload))


@pytest.mark.parametrize("code", ["1.0.1\n", "\u0661.\u0660.\u0661", "2.5.259 "])
def test_a_quality_code_is_ascii_digits_and_nothing_else(code: str) -> None:
    block = {"meter": "M1", "kind": "interval", "channel": "1-0:1.29.0.255",
             "readings": [{"t": "2026-03-09T10:15:00Z", "v": 1.0, "q": [code]}]}  # fmt: skip
    payload = json.dumps({"seq": 1, "blocks": [block]}).encode()
    assert lean_readings(payload, 1.0) is None and schema_readings(payload, 1.0) is None


async def test_the_event_loop_gets_a_turn_between_the_messages_of_a_batch(tmp_path: Path) -> None:
    """A batch of messages each just under the size that goes to a thread is still seconds of
    decoding: the API and switching get their turns between messages, not after the batch."""
    outbox = Outbox(tmp_path / "outbox.sqlite")
    link = ConcentratorLink("127.0.0.1", 1, outbox)
    turns = 0

    async def other_work() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    def data(seq: int) -> aiomqtt.Message:
        block = {"meter": f"M{seq}", "kind": "interval", "channel": "1-0:1.29.0.255",
                 "readings": [{"t": "2026-03-09T10:15:00Z", "v": 1.0}]}  # fmt: skip
        payload = json.dumps({"seq": seq, "blocks": [block]}).encode()
        return aiomqtt.Message(f"{ROOT}/dc/dc-1/data", payload, 1, False, seq, None)

    accept = outbox.accept_series
    turns_at_accept = -1

    async def counted_accept(*args: Any, **kwargs: Any) -> int:
        nonlocal turns_at_accept
        turns_at_accept = turns
        return await accept(*args, **kwargs)

    outbox.accept_series = counted_accept  # type: ignore[method-assign]
    other = asyncio.create_task(other_work())
    await asyncio.sleep(0)
    before = turns
    await link._handle([data(seq) for seq in range(1, 11)])
    other.cancel()
    assert turns_at_accept - before >= 9 and outbox.depth() == 10, "a turn between each two messages"
    outbox.close()
