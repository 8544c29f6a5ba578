"""Whatever arrives on the broker, the concentrator link handles it or quarantines it, in
bounded time and bounded memory (issue #14): hypothesis feeds it states, data and answers,
well-formed and not, for its own concentrator, another one and one it never heard of."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiomqtt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headend.protocols.mqtt import MAX_GAPS, ConcentratorLink
from headend.protocols.mqtt_schema import ROOT
from headend.storage.outbox import Outbox

CONCENTRATORS = ["dc-own", "dc-other", "dc-unknown"]
METERS = ["M1", "M2", "M9", "X"]

seqs = st.one_of(st.integers(-2, 40), st.integers(0, 10**12))
points = st.fixed_dictionaries({
    "t": st.sampled_from(["2026-03-09T10:15:00Z", "2026-03-09T10:30:00+01:00", "yesterday", ""]),
    "v": st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3)),
})  # fmt: skip
blocks = st.fixed_dictionaries({
    "meter": st.sampled_from(METERS),
    "kind": st.sampled_from(["interval", "register", "event", "other"]),
    "channel": st.sampled_from(["1-0:1.29.0.255", "1-0:1.8.0.255", "not-obis"]),
    "readings": st.lists(points, max_size=3),
})  # fmt: skip
data = st.fixed_dictionaries({"seq": seqs, "blocks": st.lists(blocks, max_size=3)})
states = st.fixed_dictionaries({
    "status": st.sampled_from(["online", "offline", "maybe"]),
    "bdseq": st.one_of(st.integers(-1, 5), st.integers(0, 10**18)),
    "seq": st.one_of(st.none(), seqs),
    "meters": st.lists(st.fixed_dictionaries({"id": st.sampled_from(METERS)}), max_size=3),
})  # fmt: skip
answers = st.fixed_dictionaries({
    "correlation_id": st.text(max_size=8), "status": st.sampled_from(["ok", "error", "?"]),
    "meter": st.sampled_from([*METERS, None]), "command": st.sampled_from(["relay", "relay_state", None]),
})  # fmt: skip
payloads = st.one_of(
    data.map(json.dumps), states.map(json.dumps), answers.map(json.dumps),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")), st.just("{}"), st.just(""),
)  # fmt: skip
messages = st.tuples(st.sampled_from(CONCENTRATORS), st.sampled_from(["data", "state", "resp", "cmd/relay"]),
                     payloads)  # fmt: skip


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(batch=st.lists(messages, min_size=1, max_size=6))
def test_every_message_is_handled_or_quarantined_in_bounded_time(
    tmp_path_factory: object, batch: list[tuple[str, str, str]]
) -> None:
    directory: Path = tmp_path_factory.mktemp("fuzz")  # type: ignore[attr-defined]
    outbox = Outbox(directory / "outbox.sqlite")
    link = ConcentratorLink("127.0.0.1", 1, outbox, meters_of={"dc-own": {"M1", "M2"}, "dc-other": {"M9"}},
                            max_seq_gap=100)  # fmt: skip

    async def feed() -> None:
        incoming = [aiomqtt.Message(f"{ROOT}/dc/{dc}/{kind}", payload.encode("utf-8", "surrogateescape"), 1,
                                    False, i, None) for i, (dc, kind, payload) in enumerate(batch)]  # fmt: skip
        async with asyncio.timeout(5):
            await link._handle(incoming)

    try:
        asyncio.run(feed())
        for dc, state in link.concentrators.items():
            assert dc != "dc-unknown", "nothing is kept of a concentrator the link does not have"
            assert len(state.gaps) <= MAX_GAPS
            assert all(g.last - g.first < 100 for g in state.gaps), "no gap wider than max_seq_gap"
        for pending in outbox.take_sync(1000):
            assert pending.series is not None
            assert (pending.series.meter, pending.series.source) in {
                ("M1", "mqtt/dc-own"), ("M2", "mqtt/dc-own"), ("M9", "mqtt/dc-other")}  # fmt: skip
    finally:
        outbox.close()
