"""The simulators' history never changes (issue #15): a profile row, once recorded, stays as it
was whatever happens later (disconnect, reconnect, clock set, clock jump), a clock set moves
only the meter's clock from then on, and a disconnected meter records no consumption while
it is off. End-to-end tests compare the head-end with these histories: they must not lie."""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime, timedelta

from headend.localservers import MosquittoServer
from headend.protocols.dlms import xdlms
from simulators.clock import Clock, ManualClock
from simulators.dlms_meter import A_PLUS, SimulatedDlmsMeter
from simulators.physics import LoadModel
from tests.conftest import Spawn

START = datetime(2026, 3, 9, tzinfo=UTC)
STEP = timedelta(minutes=15)


def test_a_dlms_meters_profile_never_changes_after_a_disconnect_a_reconnect_and_clock_sets() -> None:
    clock = ManualClock(START)
    meter = SimulatedDlmsMeter("M", clock, installed=START - timedelta(days=1))
    clock.advance(6 * 3600)
    before = meter.profile_rows(START, START + timedelta(hours=6))
    assert len(before) == 6 * 4 + 1
    meter.load.set_relay(False, clock.now())  # disconnected for two hours
    clock.advance(2 * 3600)
    meter.load.set_relay(True, clock.now())
    meter.change_clock(3600.0)  # set an hour fast
    clock.advance(1800)
    meter.change_clock(-600.0)  # then ten minutes slow
    clock.advance(3600)
    assert meter.profile_rows(START, START + timedelta(hours=6)) == before, "recorded rows never change"


def test_a_disconnected_meter_records_no_consumption_and_its_register_stands_still() -> None:
    clock = ManualClock(START)
    meter = SimulatedDlmsMeter("M", clock, installed=START)
    clock.advance(3600)
    off = clock.now()
    meter.load.set_relay(False, off)
    clock.advance(3600)
    meter.load.set_relay(True, clock.now())
    clock.advance(3600)
    register = {t: meter.register_value(A_PLUS, t.timestamp()) for t in
                (START + k * STEP for k in range(13))}  # fmt: skip
    steps = [register[START + (k + 1) * STEP] - register[START + k * STEP] for k in range(12)]
    assert all(s > 0 for s in steps[:4]) and steps[4:8] == [0, 0, 0, 0] and all(s > 0 for s in steps[8:])


def test_a_clock_set_moves_only_the_meters_clock_from_then_on() -> None:
    clock = ManualClock(START)
    meter = SimulatedDlmsMeter("M", clock, installed=START)
    meter.faults.clock_offset_s = 7200.0  # two hours fast from the start
    clock.advance(3 * 3600)
    fast = meter.profile_rows(START, START + timedelta(hours=6))
    meter.change_clock(0.0)  # synced at 03:00
    clock.advance(3600)
    after = meter.profile_rows(START, START + timedelta(hours=6))
    assert after[: len(fast)] == fast, "the rows stamped while it was fast keep their stamps"
    # While fast it stamped 02:00..05:00 for true 00:00..03:00; synced, it stamps 03:00.. again.
    assert len(after) == len(fast) + 4


def test_physics_history_is_immutable() -> None:
    load = LoadModel(t0=START.timestamp())
    t = START.timestamp() + 3600
    before = load.import_kwh(t)
    load.set_relay(False, t + 600)
    load.set_relay(True, t + 7200)
    load.set_relay(False, t + 9000)
    assert load.import_kwh(t) == before
    assert load.import_kwh(t + 600) == load.import_kwh(t + 7000) < load.import_kwh(t + 7300)


async def test_the_concentrator_clock_runs_after_publishing_a_backlog(
    spawn: Spawn, mosquitto_server: MosquittoServer
) -> None:
    """`--backlog-days`: the history goes out at once, then the concentrator keeps real time
    (its answers to clock commands are now, not the moment the backlog started)."""
    import aiomqtt

    from headend.protocols.mqtt_schema import Command, Response, command_topic, response_topic

    proc = await spawn(sys.executable, "-m", "simulators.mqtt_concentrator", "--broker",
                       f"127.0.0.1:{mosquitto_server.port}", "--concentrators", "1", "--meters", "1",
                       "--backlog-days", "1", "--start-delay", "0.2", stdout=asyncio.subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        while b"published" not in await proc.stdout.readline():
            pass
    async with aiomqtt.Client("127.0.0.1", mosquitto_server.port, identifier="clock-check") as client:
        await client.subscribe(response_topic("dc-000"), qos=1)
        command = Command(correlation_id="c1", reply_to=response_topic("dc-000"), meter="dc-000-m0000")
        await client.publish(command_topic("dc-000", "clock"), command.model_dump_json(), qos=1)
        async with asyncio.timeout(10):
            async for message in client.messages:
                answer = Response.model_validate_json(message.payload)  # type: ignore[arg-type]
                if answer.correlation_id == "c1":
                    break
    told = datetime.fromisoformat(answer.result["time"])
    assert abs((told - Clock().datetime()).total_seconds()) < 5


def test_a_dlms_get_next_after_the_last_block_or_out_of_the_transfer_is_an_error_not_a_crash() -> None:
    """Issue #16: asking for the block after the last one raised IndexError in the simulator
    and dropped the connection; a meter answers no-long-get-in-progress (16), and a block
    number the transfer never had data-block-number-invalid (19)."""
    meter = SimulatedDlmsMeter("1", ManualClock(datetime(2026, 3, 9, tzinfo=UTC)))
    blocks = [b"one", b"two", b"three"]
    for asked, error, left in ((3, 16, []), (7, 19, []), (0, 19, [])):
        answer, kept = meter.service(xdlms.GetRequestNext(5, asked).to_bytes(), blocks, True)
        result = xdlms.parse_response(answer)
        assert isinstance(result, xdlms.GetResult) and result.error == error, (asked, result)
        assert kept == left
    answer, kept = meter.service(xdlms.GetRequestNext(5, 2).to_bytes(), blocks, True)
    result = xdlms.parse_response(answer)
    assert isinstance(result, xdlms.GetResult) and result.data == b"three" and result.last_block and kept == blocks


def test_the_dlms_simulator_answers_what_it_cannot_serve_and_keeps_the_association() -> None:
    """Issue #16's attacker pass: a malformed clock SET raised out of the association and
    dropped the line (on a serial bus: every meter on it)."""
    from headend.protocols.dlms import codec
    from simulators.dlms_meter import CLOCK, Association

    meter = SimulatedDlmsMeter("1", ManualClock(datetime(2026, 3, 9, tzinfo=UTC)))
    association = Association(meter)
    association.handle(codec.aarq(codec.AUTH_LLS, b"12345678"))
    for data in (b"\x09\x0c\x07", bytes.fromhex("090c07ea0d01ff0000000080 0000".replace(" ", ""))):
        reply = xdlms.parse_response(association.handle(
            xdlms.SetRequest(0xC1, xdlms.Attribute(8, CLOCK, 2), data).to_bytes()))  # fmt: skip
        assert isinstance(reply, xdlms.SetResult) and reply.result == 12  # type-unmatched
    answer = xdlms.parse_response(association.handle(xdlms.GetRequest(0xC2, xdlms.Attribute(8, CLOCK, 2)).to_bytes()))
    assert isinstance(answer, xdlms.GetResult) and answer.error is None  # the association goes on
