"""Concentrator ingest against a rogue publisher on the broker (issue #14): a huge seq jump
is quarantined instead of opening millions of gaps, refused messages leave their seq free
for the genuine one, data is taken only from the link's own concentrators for their own
meters, and a forged retained "offline" cannot hold a concentrator offline."""

from __future__ import annotations

import asyncio
import resource
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt
import pytest

from headend.localservers import MosquittoServer
from headend.protocols.mqtt import ConcentratorLink
from headend.protocols.mqtt_schema import Block, Data, Point, State, data_topic, state_topic
from headend.storage.outbox import Outbox

T = datetime(2026, 3, 9, 10, 15, tzinfo=UTC)


def message(seq: int, meter: str, value: float = 1.5, at: datetime | None = None) -> bytes:
    block = Block(meter=meter, kind="interval", channel="1-0:1.29.0.255", unit="kWh", interval_s=900,
                  readings=[Point(t=at or T, v=value)])  # fmt: skip
    return Data(seq=seq, blocks=[block]).model_dump_json().encode()


def birth(seq: int, bdseq: int, meters: list[str]) -> bytes:
    return State(status="online", bdseq=bdseq, seq=seq,
                 meters=[{"id": m} for m in meters]).model_dump_json().encode()  # type: ignore[misc]  # fmt: skip


class Site:
    def __init__(self, port: int, outbox: Outbox) -> None:
        self.port = port
        self.outbox = outbox
        self.dc = f"dc-{uuid.uuid4().hex[:8]}"
        self.other = f"dc-{uuid.uuid4().hex[:8]}"
        self.meters_of = {self.dc: {"M1", "M2"}, self.other: {"M9"}}

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port, identifier=f"pub-{uuid.uuid4().hex[:6]}") as client:
            await client.publish(topic, payload, qos=1, retain=retain)

    def values(self) -> dict[str, float | None]:
        return {r.meter: r.value for p in self.outbox.take_sync(1000) for r in p.readings}


@pytest.fixture
async def site(tmp_path: Path, mosquitto_server: MosquittoServer) -> AsyncIterator[tuple[Site, ConcentratorLink]]:
    outbox = Outbox(tmp_path / "outbox.sqlite")
    s = Site(mosquitto_server.port, outbox)
    async with ConcentratorLink("127.0.0.1", s.port, outbox, headend_id=f"he-{s.dc}", meters_of=s.meters_of,
                                max_seq_gap=10_000) as link:  # fmt: skip
        await link.connected.wait()
        await s.publish(state_topic(s.dc), birth(10, 1, ["M1", "M2"]), retain=True)
        await link.until(lambda: s.dc in link.concentrators and link.concentrators[s.dc].online)
        yield s, link
    outbox.close()


async def test_a_huge_seq_is_quarantined_and_its_neighbours_still_count(site: tuple[Site, ConcentratorLink]) -> None:
    s, link = site
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    await s.publish(data_topic(s.dc), message(10**9, "M1", value=666.0))
    await link.until(lambda: link.stats.bad_messages == 1)
    c = link.concentrators[s.dc]
    assert c.highest == 10 and c.gaps == [], "no gap of a billion seqs"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 20_000  # KiB
    (_body, reason), = [q for q in s.outbox.quarantined() if "max_seq_gap" in q[1]]
    assert str(10**9 - 10) in reason
    await s.publish(data_topic(s.dc), message(11, "M1", value=2.5))
    await link.until(lambda: link.concentrators[s.dc].highest == 11)
    assert s.values() == {"M1": 2.5}


async def test_a_refused_message_leaves_its_seq_for_the_genuine_one(site: tuple[Site, ConcentratorLink]) -> None:
    s, link = site
    await s.publish(data_topic(s.dc), message(11, "M9", value=666.0))  # M9 not behind this concentrator
    await link.until(lambda: link.stats.bad_messages == 1)
    assert link.concentrators[s.dc].highest == 10
    await s.publish(data_topic(s.dc), message(11, "M1", value=2.5))
    await link.until(lambda: link.concentrators[s.dc].highest == 11)
    assert s.values() == {"M1": 2.5} and link.stats.duplicates == 0


@pytest.mark.parametrize("sender", ["unknown", "other"])
async def test_data_for_a_known_meter_from_the_wrong_concentrator_is_not_stored(
    site: tuple[Site, ConcentratorLink], sender: str
) -> None:
    s, link = site
    rogue = "dc-rogue" if sender == "unknown" else s.other
    await s.publish(data_topic(rogue), message(1, "M1", value=666.0))
    await link.until(lambda: link.stats.bad_messages == 1)
    (_body, reason), = s.outbox.quarantined()
    assert ("not a concentrator of this link" if sender == "unknown" else "not behind") in reason
    assert s.values() == {} and "dc-rogue" not in link.concentrators


async def test_a_forged_retained_offline_cannot_hold_a_concentrator_offline(
    site: tuple[Site, ConcentratorLink],
) -> None:
    s, link = site
    offline = State(status="offline", bdseq=10**15).model_dump_json().encode()
    await s.publish(state_topic(s.dc), offline, retain=True)
    await asyncio.sleep(0.3)
    assert link.concentrators[s.dc].online, "a death for another birth is ignored"
    await s.publish(state_topic(s.dc), birth(10, 2, ["M1", "M2"]), retain=True)  # the next genuine birth
    await link.until(lambda: link.concentrators[s.dc].bdseq == 2 and link.concentrators[s.dc].online)


def test_each_installation_has_its_own_mqtt_client_id(tmp_path: Path) -> None:
    from headend.installation import LEGACY_ID, installation_id

    first, second = installation_id(tmp_path / "a"), installation_id(tmp_path / "b")
    assert first != second and first.startswith("he-") and installation_id(tmp_path / "a") == first
    assert (tmp_path / "a" / "installation_id").stat().st_mode & 0o777 == 0o600
    upgraded = tmp_path / "old"
    upgraded.mkdir()
    (upgraded / "journal.sqlite").write_bytes(b"")  # ran before installation ids existed
    assert installation_id(upgraded) == LEGACY_ID, "an upgrade keeps its persistent session"


async def test_a_seq_beyond_any_storable_number_poisons_nothing(site: tuple[Site, ConcentratorLink]) -> None:
    s, link = site
    huge = b'{"status": "online", "bdseq": 5, "seq": 9223372036854775808, "meters": [{"id": "M1"}]}'
    await s.publish(state_topic(s.dc), huge, retain=True)
    await s.publish(data_topic(s.other), message(1, "M9", value=3.5))  # another concentrator goes on
    await link.until(lambda: link.stats.bad_messages == 1 and link.stats.received >= 3)
    await link.until(lambda: s.outbox.depth() == 1)
    assert s.values() == {"M9": 3.5}
    await s.publish(state_topic(s.dc), b"", retain=True)  # the broker is shared: take the poison away


async def test_a_concentrator_that_counts_again_from_zero_loses_nothing(site: tuple[Site, ConcentratorLink]) -> None:
    s, link = site
    for seq in (11, 12):
        await s.publish(data_topic(s.dc), message(seq, "M1", value=float(seq)))
    await link.until(lambda: link.concentrators[s.dc].highest == 12)
    await s.publish(state_topic(s.dc), birth(0, 7, ["M1", "M2"]), retain=True)  # a replaced unit: a new birth
    await link.until(lambda: link.concentrators[s.dc].bdseq == 7)
    await s.publish(data_topic(s.dc), message(1, "M2", value=99.0))
    await link.until(lambda: link.concentrators[s.dc].highest == 1)
    assert s.values()["M2"] == 99.0 and link.stats.duplicates == 0
