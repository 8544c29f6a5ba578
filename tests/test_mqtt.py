"""Concentrators over a real Mosquitto broker: acked after durable, gaps backfilled, commands answered."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import aiomqtt
import pytest

from headend.config import MqttLink, parse_config
from headend.localservers import MosquittoServer
from headend.model import EVENT_LOG, IMPORT_ENERGY, IMPORT_INTERVAL, RelayAction, RelayState
from headend.protocols.base import LinkDown, MeterSession, Refused, Timeout
from headend.protocols.mqtt import ConcentratorLink
from headend.protocols.mqtt_schema import data_topic
from headend.storage.outbox import Outbox
from simulators.clock import ManualClock
from simulators.mqtt_concentrator import ConcentratorFaults, SimulatedConcentrator
from tests.certs import self_signed
from tests.factories import T0

STEP = timedelta(minutes=15)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    box = Outbox(tmp_path / "outbox.sqlite")
    yield box
    box.close()


@pytest.fixture
async def link(mosquitto_server: MosquittoServer, outbox: Outbox) -> AsyncIterator[ConcentratorLink]:
    async with ConcentratorLink(
        "127.0.0.1", mosquitto_server.port, outbox, headend_id=unique("he"), gap_grace=0.4, command_timeout=3
    ) as link:
        await link.connected.wait()
        yield link


def dc(
    mosquitto_server: MosquittoServer, clock: ManualClock, meters: int = 3, **faults: object
) -> SimulatedConcentrator:
    cid = unique("dc")
    return SimulatedConcentrator(
        cid,
        "127.0.0.1",
        mosquitto_server.port,
        [f"{cid}-m{i}" for i in range(meters)],
        clock,
        faults=ConcentratorFaults(**faults),  # type: ignore[arg-type]
    )


def stored(outbox: Outbox) -> dict[tuple[str, str], float | None]:
    return {(r.meter, r.timestamp.isoformat()): r.value for p in outbox.take_sync(100_000) for r in p.readings}


async def test_birth_brings_a_concentrator_online_with_its_inventory(
    link: ConcentratorLink, mosquitto_server: MosquittoServer, clock: ManualClock
) -> None:
    sim = dc(mosquitto_server, clock, meters=4)
    await sim.start()
    await link.until(lambda: sim.id in link.concentrators and link.concentrators[sim.id].online)
    state = link.concentrators[sim.id]
    assert sorted(state.meters) == sorted(sim.loads)
    assert state.firmware == "dc-sim 1.0"
    await sim.crash()  # no DISCONNECT: the broker publishes the Last Will
    await link.until(lambda: not link.concentrators[sim.id].online)
    await sim.start()  # a new birth (bdseq + 1) brings it back
    await link.until(lambda: link.concentrators[sim.id].online and link.concentrators[sim.id].bdseq == 1)
    await sim.stop()


async def test_interval_blocks_are_accepted_into_the_outbox_before_the_ack(
    link: ConcentratorLink, mosquitto_server: MosquittoServer, clock: ManualClock, outbox: Outbox
) -> None:
    sim = dc(mosquitto_server, clock, meters=3)
    await sim.start()
    await link.until(lambda: sim.id in link.concentrators)
    clock.advance(4 * 3600)
    assert await sim.publish_until(clock.datetime()) == 16  # one message per interval, 3 meters in each
    await link.until(lambda: link.stats.accepted_readings == 48)
    rows = stored(outbox)
    assert len(rows) == 48
    meter = next(iter(sim.loads))
    first_end = sim.published_until - 15 * STEP
    load = sim.loads[meter]
    expected = (
        round((load.import_kwh(first_end.timestamp()) - load.import_kwh(first_end.timestamp() - 900)) * 1000) / 1000
    )
    assert rows[(meter, first_end.isoformat())] == expected
    taken = outbox.take_sync(1)[0].readings[0]
    assert taken.channel == IMPORT_INTERVAL and taken.source == f"mqtt/{sim.id}"
    cursors = outbox.cursors(f"mqtt:{sim.id}:")
    assert (cursors[f"mqtt:{sim.id}:watermark"], cursors[f"mqtt:{sim.id}:highest"]) == (15, 15)
    await sim.stop()


async def test_duplicates_and_out_of_order_are_harmless(
    link: ConcentratorLink, mosquitto_server: MosquittoServer, clock: ManualClock, outbox: Outbox
) -> None:
    sim = dc(mosquitto_server, clock, meters=2, duplicate=True, out_of_order=True)
    await sim.start()
    await link.until(lambda: sim.id in link.concentrators)
    clock.advance(2 * 3600)
    await sim.publish_until(clock.datetime())
    # Every message arrives twice; the second copy of each is recognised and not stored again.
    await link.until(lambda: link.concentrators[sim.id].watermark == 7 and link.stats.duplicates == 8)
    assert len(stored(outbox)) == 16 and outbox.depth() == 16
    assert link.stats.backfills == 0
    await sim.stop()


async def test_a_sequence_gap_triggers_a_backfill_that_fills_it(
    link: ConcentratorLink, mosquitto_server: MosquittoServer, clock: ManualClock, outbox: Outbox
) -> None:
    sim = dc(mosquitto_server, clock, meters=2, drop_seqs={3, 4, 9})
    await sim.start()
    await link.until(lambda: sim.id in link.concentrators)
    clock.advance(3 * 3600)
    await sim.publish_until(clock.datetime())  # seq 0..11, 3, 4 and 9 never published live
    await link.until(lambda: link.concentrators[sim.id].watermark == 11, timeout=20)
    backfills = [c for name, c in sim.commands if name == "backfill"]
    assert {(c.args["seq_from"], c.args["seq_to"]) for c in backfills} == {(3, 4), (9, 9)}
    assert link.stats.gaps >= 2
    assert len(stored(outbox)) == 24
    await sim.stop()


async def test_commands_answer_with_read_back(
    link: ConcentratorLink, mosquitto_server: MosquittoServer, clock: ManualClock
) -> None:
    sim = dc(mosquitto_server, clock, meters=2, stuck_relays=set(), clock_drift_s=42.0)
    await sim.start()
    await link.until(lambda: sim.id in link.concentrators and link.concentrators[sim.id].online)
    meter = next(iter(sim.loads))
    async with link.session(meter, sim.id) as session:
        assert isinstance(session, MeterSession)
        clock.advance(3600)
        (energy,) = await session.read_registers([IMPORT_ENERGY])
        assert energy.value == pytest.approx(sim.loads[meter].import_kwh(clock.now()))
        profile = await session.read_profile(IMPORT_INTERVAL, clock.datetime() - timedelta(hours=1), clock.datetime())
        assert len(profile) == 0  # nothing published yet: the concentrator has no intervals
        await sim.publish_until(clock.datetime())
        profile = await session.read_profile(IMPORT_INTERVAL, clock.datetime() - timedelta(hours=1), clock.datetime())
        assert len(profile) == 4 and all(r.kind == "interval" for r in profile)
        meter_time = await session.read_clock()
        assert (meter_time - clock.datetime()).total_seconds() == pytest.approx(42.0)
        await session.set_clock(clock.datetime())
        assert await session.read_clock() == clock.datetime()
        events = await session.read_events(clock.datetime() - timedelta(hours=1), clock.datetime() + timedelta(hours=1))
        by_code = {r.value: r for r in events}
        assert sorted(by_code) == [4.0, 5.0] and all(r.kind == "event" and r.channel == EVENT_LOG for r in events)
        # Clock adjusted: the old time (4) is logged in the meter's time, 42 s ahead of the new (5).
        assert (by_code[4.0].timestamp - by_code[5.0].timestamp).total_seconds() == pytest.approx(42, abs=1)
        assert await session.read_relay() == RelayState.CONNECTED
        await session.operate_relay(RelayAction.DISCONNECT)
        assert await session.read_relay() == RelayState.DISCONNECTED
        await session.operate_relay(RelayAction.RECONNECT)
        assert await session.read_relay() == RelayState.CONNECTED
    await sim.stop()


async def test_a_stuck_relay_shows_in_the_read_back(
    link: ConcentratorLink, mosquitto_server: MosquittoServer, clock: ManualClock
) -> None:
    sim = dc(mosquitto_server, clock, meters=1)
    meter = next(iter(sim.loads))
    sim.faults.stuck_relays.add(meter)
    await sim.start()
    await link.until(lambda: sim.id in link.concentrators and link.concentrators[sim.id].online)
    session = link.session(meter, sim.id)
    await session.operate_relay(RelayAction.DISCONNECT)
    assert await session.read_relay() == RelayState.CONNECTED
    await sim.stop()


async def test_command_errors_map_to_meter_errors(
    link: ConcentratorLink, mosquitto_server: MosquittoServer, clock: ManualClock
) -> None:
    sim = dc(mosquitto_server, clock, meters=1)
    await sim.start()
    await link.until(lambda: sim.id in link.concentrators and link.concentrators[sim.id].online)
    with pytest.raises(Refused, match="unknown_meter"):
        await link.session("not-here", sim.id).read_relay()
    sim.faults.ignore_commands = True
    with pytest.raises(Timeout, match="did not answer relay_state"):
        await link.command(sim.id, "relay_state", meter=next(iter(sim.loads)), timeout=0.5)
    await sim.crash()
    await link.until(lambda: not link.concentrators[sim.id].online)
    with pytest.raises(LinkDown, match="is offline"):
        await link.session(next(iter(sim.loads)), sim.id).read_relay()


async def test_a_bad_message_is_quarantined_and_the_link_goes_on(
    link: ConcentratorLink, mosquitto_server: MosquittoServer, clock: ManualClock, outbox: Outbox
) -> None:
    sim = dc(mosquitto_server, clock, meters=1)
    await sim.start()
    await link.until(lambda: sim.id in link.concentrators)
    meter = next(iter(sim.loads))

    def message(seq: object, meter: str, t: str = "2026-01-01T00:15:00Z", v: object = 1) -> str:
        block = {"meter": meter, "kind": "interval", "channel": "1-0:1.29.0.255", "readings": [{"t": t, "v": v}]}
        return json.dumps({"seq": seq, "blocks": [block]})

    async with aiomqtt.Client("127.0.0.1", mosquitto_server.port) as rogue:
        await rogue.publish(data_topic(sim.id), b'{"seq": 1, "garbage', qos=1)  # not JSON
        await rogue.publish(data_topic(sim.id), message("x", meter), qos=1)  # seq of the wrong type
        await rogue.publish(data_topic(sim.id), message(1, meter, v="lots"), qos=1)  # value of the wrong type
        await rogue.publish(data_topic(sim.id), message(1, meter, t="2026-01-01T00:15:00"), qos=1)  # no timezone
        await rogue.publish(data_topic(sim.id), message(1, "someone-else"), qos=1)  # not in the inventory
    await link.until(lambda: link.stats.bad_messages == 5)
    quarantined = outbox.quarantined()
    assert len(quarantined) == 5 and b"garbage".hex() in quarantined[0][0]
    assert "meter 'someone-else' not behind" in quarantined[4][1]
    assert outbox.depth() == 0
    clock.advance(900)
    await sim.publish_until(clock.datetime())
    await link.until(lambda: link.stats.accepted_readings == 1)
    await sim.stop()


async def test_a_time_range_backfill_publishes_the_intervals_again(
    link: ConcentratorLink, mosquitto_server: MosquittoServer, clock: ManualClock, outbox: Outbox
) -> None:
    sim = dc(mosquitto_server, clock, meters=2, drop_seqs={0, 1, 2, 3})  # the first hour never arrives
    await sim.start()
    await link.until(lambda: sim.id in link.concentrators and link.concentrators[sim.id].online)
    meter = next(iter(sim.loads))
    clock.advance(3600)
    await sim.publish_until(clock.datetime())
    response = await link.command(
        sim.id, "backfill", meter=meter, args={"start": T0.isoformat(), "end": clock.datetime().isoformat()}
    )
    assert response.result == {"published": 1, "intervals": 4}
    await link.until(lambda: link.stats.accepted_readings >= 4)
    assert sorted(k[1] for k in stored(outbox) if k[0] == meter) == [(T0 + k * STEP).isoformat() for k in range(1, 5)]
    await sim.stop()


async def test_mqtt_311_sessions_work_with_correlation_in_the_payload(
    mosquitto_server: MosquittoServer, clock: ManualClock, outbox: Outbox
) -> None:
    v311 = aiomqtt.ProtocolVersion.V311
    async with ConcentratorLink(
        "127.0.0.1", mosquitto_server.port, outbox, headend_id=unique("he"), protocol=v311, command_timeout=3
    ) as link:
        await link.connected.wait()
        cid = unique("dc")
        sim = SimulatedConcentrator(cid, "127.0.0.1", mosquitto_server.port, [f"{cid}-m0"], clock, protocol=v311)
        await sim.start()
        await link.until(lambda: cid in link.concentrators and link.concentrators[cid].online)
        session = link.session(f"{cid}-m0", cid)
        await session.operate_relay(RelayAction.DISCONNECT)
        assert await session.read_relay() == RelayState.DISCONNECTED
        clock.advance(1800)
        await sim.publish_until(clock.datetime())
        await link.until(lambda: link.stats.accepted_readings == 2)
        await sim.stop()


async def test_a_link_from_the_config_accepts_only_registry_meters_with_their_multiplier(
    mosquitto_server: MosquittoServer, clock: ManualClock, outbox: Outbox
) -> None:
    cid = unique("dc")
    cfg = parse_config(
        {
            "links": [{"id": "broker", "kind": "mqtt", "host": "127.0.0.1", "port": mosquitto_server.port}],
            "concentrators": [{"id": cid, "link": "broker"}],
            "meters": [{"id": f"{cid}-m0", "concentrator": cid, "ct": {"primary": 150, "secondary": 5}}],
        }
    )
    link_cfg = cfg.links[0]
    assert isinstance(link_cfg, MqttLink)
    sim = SimulatedConcentrator(cid, "127.0.0.1", mosquitto_server.port, [f"{cid}-m0", f"{cid}-m1"], clock)
    async with ConcentratorLink.from_config(link_cfg, outbox, cfg, headend_id=unique("he")) as link:
        await link.connected.wait()
        await sim.start()
        await link.until(lambda: cid in link.concentrators)
        clock.advance(900)
        await sim.publish_until(clock.datetime())
        await link.until(lambda: link.stats.accepted_readings == 1 and link.stats.bad_messages == 1)
        (reading,) = [r for p in outbox.take_sync(10) for r in p.readings]
        assert reading is not None and reading.meter == f"{cid}-m0" and reading.multiplier == 30.0
        assert reading.value == pytest.approx((reading.raw or 0) / 1000 * 30)
        await sim.stop()


async def test_a_link_over_tls_to_the_broker(tmp_path: Path, clock: ManualClock, outbox: Outbox) -> None:
    cert, key = self_signed(tmp_path)
    broker = MosquittoServer(tmp_path / "mosquitto", tls=(cert, key))
    broker.start()
    try:
        cid = unique("dc")
        cfg = parse_config({
            "links": [{"id": "broker", "kind": "mqtt", "host": "127.0.0.1", "port": broker.port, "tls": True,
                       "ca_file": str(cert)}],
            "concentrators": [{"id": cid, "link": "broker"}],
            "meters": [{"id": f"{cid}-m0", "concentrator": cid}],
        })  # fmt: skip
        link_cfg = cfg.links[0]
        assert isinstance(link_cfg, MqttLink)
        sim = SimulatedConcentrator(cid, "127.0.0.1", broker.port, [f"{cid}-m0"], clock, tls=link_cfg.tls_context())
        async with ConcentratorLink.from_config(link_cfg, outbox, cfg, headend_id=unique("he")) as link:
            await link.connected.wait()
            await sim.start()
            clock.advance(900)
            await sim.publish_until(clock.datetime())
            await link.until(lambda: link.stats.accepted_readings == 1)
            await sim.stop()
        plain = SimulatedConcentrator(unique("dc"), "127.0.0.1", broker.port, ["x"], clock)
        with pytest.raises((aiomqtt.MqttError, TimeoutError)):  # no TLS, no session: refused or no CONNACK
            await asyncio.wait_for(plain.start(), 3)
    finally:
        broker.stop()


async def test_a_rogue_taking_the_head_ends_client_id_costs_nothing(
    link: ConcentratorLink, mosquitto_server: MosquittoServer, clock: ManualClock, outbox: Outbox
) -> None:
    """Without an ACL a client can connect with the head-end's id: the broker drops the head-end
    and, with a clean start, its queued session. The head-end reconnects, notices the seq gap
    and asks the concentrator again: nothing is lost."""
    sim = dc(mosquitto_server, clock, meters=2)
    await sim.start()
    await link.until(lambda: sim.id in link.concentrators)
    clock.advance(3600)
    await sim.publish_until(clock.datetime())  # seq 0..3
    await link.until(lambda: link.concentrators[sim.id].watermark == 3)
    connects = link.stats.connects
    async with aiomqtt.Client("127.0.0.1", mosquitto_server.port, identifier=link.client_id, clean_start=True,
                              protocol=aiomqtt.ProtocolVersion.V5):
        clock.advance(3600)
        await sim.publish_until(clock.datetime())  # seq 4..7 while the head-end is pushed off
    await link.until(lambda: link.stats.connects > connects and link.connected.is_set(), timeout=30)
    clock.advance(900)
    await sim.publish_until(clock.datetime())  # seq 8: the gap 4..7 shows
    await link.until(lambda: link.concentrators[sim.id].watermark == 8, timeout=30)
    assert len(stored(outbox)) == 2 * 9
    await sim.stop()
