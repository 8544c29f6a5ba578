"""The DLMS client against the DLMS meter simulator, over the TCP wrapper and over HDLC on a
real pty pair (every test runs on both)."""

from __future__ import annotations

import asyncio
import resource
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from headend.model import Obis, Quality, RelayAction, RelayState
from headend.protocols.base import BadFrame, MeterSession, Refused, Timeout, Unsupported
from headend.protocols.dlms import client as client_module
from headend.protocols.dlms import codec, wrapper, xdlms
from headend.protocols.dlms.client import DlmsSession
from headend.protocols.dlms.security import InvocationCounters, Protection, ProtectionError
from simulators.clock import ManualClock
from simulators.dlms_meter import DEFAULT_KEYS, ENERGIES, PROFILE, HdlcBus, SimulatedDlmsMeter
from simulators.ptypair import NullModem

NOW = datetime(2026, 3, 8, 6, 0, tzinfo=UTC)
A_PLUS = Obis(1, 0, 1, 8, 0)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(NOW)


# How each test's meter is reached: ("wrapper", port) or ("hdlc", pty device).
ENDPOINTS: dict[int, tuple[str, int | str]] = {}


@pytest.fixture(params=["wrapper", "hdlc"])
async def meter(request: pytest.FixtureRequest, clock: ManualClock) -> AsyncIterator[SimulatedDlmsMeter]:
    m = SimulatedDlmsMeter("1", clock, block_size=512)
    if request.param == "wrapper":
        ENDPOINTS[id(m)] = ("wrapper", await m.start())
        yield m
        await m.stop()
    else:
        with NullModem() as modem:
            bus = HdlcBus({0x11: m})
            await bus.start_serial(modem.a, 19200)
            ENDPOINTS[id(m)] = ("hdlc", modem.b)
            yield m
            await bus.stop()
    del ENDPOINTS[id(m)]


def session(meter: SimulatedDlmsMeter, clock: ManualClock, **kw: Any) -> DlmsSession:
    kw.setdefault("authentication", "lls")
    kw.setdefault("password", b"12345678")
    kw.setdefault("timeout", 2.0)
    kw.setdefault("now", clock.datetime)
    kind, where = ENDPOINTS[id(meter)]
    if kind == "wrapper":
        return DlmsSession.tcp_wrapper("127.0.0.1", int(where), "M-1", **kw)
    return DlmsSession.hdlc_serial(str(where), "M-1", baudrate=19200, server_physical=0x11, **kw)


async def test_registers_come_with_scaler_unit_applied(meter: SimulatedDlmsMeter, clock: ManualClock) -> None:
    async with session(meter, clock, ct=40.0) as s:
        assert isinstance(s, MeterSession)
        energy, voltage, current, freq = await s.read_registers(
            [A_PLUS, Obis(1, 0, 32, 7, 0), Obis(1, 0, 31, 7, 0), Obis(1, 0, 14, 7, 0)]
        )
    t = clock.now()
    assert (energy.unit, energy.scaler, energy.raw) == ("kWh", -3, meter.register_value(A_PLUS, t))
    assert energy.value == pytest.approx(meter.register_value(A_PLUS, t) / 1000 * 40)
    assert voltage.unit == "V" and voltage.value == pytest.approx(meter.register_value(voltage.channel, t) / 10)
    assert current.unit == "A" and current.value == pytest.approx(meter.register_value(current.channel, t) / 100 * 40)
    assert freq.unit == "Hz" and freq.multiplier == 1.0


async def test_clock_read_and_set_corrects_drift(meter: SimulatedDlmsMeter, clock: ManualClock) -> None:
    meter.faults.clock_offset_s = 754.0
    async with session(meter, clock) as s:
        assert await s.read_clock() == clock.datetime() + timedelta(seconds=754)
        await s.set_clock(clock.datetime())
        assert await s.read_clock() == clock.datetime()


async def test_seven_days_of_profile_by_range_match_value_for_value(
    meter: SimulatedDlmsMeter, clock: ManualClock
) -> None:
    since = NOW - timedelta(days=7)
    async with session(meter, clock) as s:
        readings = await s.read_profile(PROFILE, since, NOW)
    assert len(readings) == 7 * 96 * 4
    # 672 rows of about 40 bytes in 512-byte blocks: the answer came in some 50 GET data blocks.
    assert meter.requests > 50
    by_channel: dict[Obis, list[float]] = {}
    for r in readings:
        by_channel.setdefault(r.channel, []).append(r.raw or 0)
        assert since < r.timestamp <= NOW and r.kind == "interval"
    for obis in ENERGIES:
        expected = [meter.register_value(obis, (since + k * timedelta(minutes=15)).timestamp()) for k in range(1, 673)]
        assert by_channel[obis] == expected


async def test_profile_since_the_last_stored_interval_and_missing_rows(
    meter: SimulatedDlmsMeter, clock: ManualClock
) -> None:
    last_stored = NOW - timedelta(hours=2)
    meter.faults.missing_intervals = {NOW - timedelta(hours=1)}
    async with session(meter, clock) as s:
        readings = await s.read_profile(PROFILE, last_stored, NOW)
    stamps = sorted({r.timestamp for r in readings})
    assert stamps == [last_stored + k * timedelta(minutes=15) for k in (1, 2, 3, 5, 6, 7, 8)]


async def test_status_column_passes_through_as_quality(meter: SimulatedDlmsMeter, clock: ManualClock) -> None:
    meter.faults.clock_offset_s = 120
    async with session(meter, clock) as s:
        readings = await s.read_profile(PROFILE, NOW - timedelta(hours=1), NOW + timedelta(minutes=5))
    assert readings and all(r.qualities == ("1.0.32",) for r in readings)
    assert Quality.MISSING not in readings[0].qualities


@pytest.mark.parametrize(
    ("mode", "after_reconnect"), [(4, RelayState.CONNECTED), (1, RelayState.READY_FOR_RECONNECTION)]
)
async def test_disconnect_and_reconnect_follow_the_control_mode(
    meter: SimulatedDlmsMeter, clock: ManualClock, mode: int, after_reconnect: RelayState
) -> None:
    meter.control_mode = mode
    async with session(meter, clock) as s:
        assert await s.read_control_mode() == mode
        await s.operate_relay(RelayAction.DISCONNECT)
        assert await s.read_relay() == RelayState.DISCONNECTED
        (before,) = await s.read_registers([A_PLUS])
        clock.advance(3600)
        (after,) = await s.read_registers([A_PLUS])
        assert after.value == before.value, "no energy through an open disconnector"
        await s.operate_relay(RelayAction.RECONNECT)
        assert await s.read_relay() == after_reconnect
        meter.press_button()
        assert await s.read_relay() == RelayState.CONNECTED


async def test_a_stuck_relay_is_seen_in_the_read_back(meter: SimulatedDlmsMeter, clock: ManualClock) -> None:
    meter.faults.stuck_relay = True
    async with session(meter, clock) as s:
        await s.operate_relay(RelayAction.DISCONNECT)
        assert await s.read_relay() == RelayState.CONNECTED


async def test_the_public_client_may_read_but_not_switch(meter: SimulatedDlmsMeter, clock: ManualClock) -> None:
    async with session(meter, clock, authentication="none", password=None) as s:
        assert await s.read_relay() == RelayState.CONNECTED
        with pytest.raises(Refused, match="read-write-denied"):
            await s.operate_relay(RelayAction.DISCONNECT)


async def test_a_wrong_password_is_refused(meter: SimulatedDlmsMeter, clock: ManualClock) -> None:
    with pytest.raises(Refused, match="association rejected: authentication_failed"):
        async with session(meter, clock, password=b"00000000"):
            pass
    assert "00000000" not in repr(session(meter, clock, password=b"00000000"))


async def test_an_aarq_refused_by_an_exception_response_is_a_refusal_that_says_why() -> None:
    """Issue #16: some meters answer an AARQ they will not take with an ExceptionResponse;
    it was a BadFrame quoting the parser ("not an AARE")."""
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frame = await wrapper.read_frame(reader)
        writer.write(wrapper.WrapperFrame(frame.destination, frame.source, bytes([0xD8, 1, 2])).to_bytes())
        await writer.drain()
        await reader.read()  # until the client closes
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(Refused, match="refused by an exception response: service-not-allowed, "
                                          "service-not-supported"):  # fmt: skip
            async with DlmsSession.tcp_wrapper("127.0.0.1", port, "M1", timeout=2):
                pass
    finally:
        server.close()
        await server.wait_closed()


async def test_an_aarq_refused_for_its_invocation_counter_is_a_refusal_too() -> None:
    """The invocation-counter-error carries the expected counter after the two error bytes."""
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frame = await wrapper.read_frame(reader)
        answer = bytes([0xD8, 1, 6, 0, 0, 0x10, 0])
        writer.write(wrapper.WrapperFrame(frame.destination, frame.source, answer).to_bytes())
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    try:
        with pytest.raises(Refused, match="invocation-counter-error"):
            async with DlmsSession.tcp_wrapper("127.0.0.1", server.sockets[0].getsockname()[1], "M1", timeout=2):
                pass
    finally:
        server.close()
        await server.wait_closed()


async def test_an_answer_for_another_invoke_id_is_not_taken(meter: SimulatedDlmsMeter, clock: ManualClock) -> None:
    """A meter that answers one request twice: the copy must not be taken as the next answer."""
    original = meter.service
    sent: list[bytes] = []

    def twice(apdu: bytes, blocks: list[bytes], lls: bool, max_pdu: int = 0xFFFF) -> tuple[bytes, list[bytes]]:
        reply, kept = original(apdu, blocks, lls, max_pdu)
        if sent:  # the second GET is answered with the first one's answer
            return sent[0], kept
        sent.append(reply)
        return reply, kept

    meter.service = twice  # type: ignore[method-assign]
    async with session(meter, clock) as s:
        await s.get(3, A_PLUS, 2)
        with pytest.raises(BadFrame, match="invoke id"):
            await s.get(3, Obis(1, 0, 2, 8, 0), 2)


async def test_unknown_objects_are_unsupported(meter: SimulatedDlmsMeter, clock: ManualClock) -> None:
    async with session(meter, clock) as s:
        with pytest.raises(Unsupported, match="object-undefined"):
            await s.read_registers([Obis(1, 0, 9, 8, 0)])


async def test_a_slow_meter_times_out(meter: SimulatedDlmsMeter, clock: ManualClock) -> None:
    meter.faults.delay = 1.0
    with pytest.raises(Timeout, match=r"no complete answer within 0\.3s"):
        async with session(meter, clock, timeout=0.3):
            pass


@pytest.mark.parametrize("fault", ["drop", "corrupt"])
async def test_broken_answers_end_the_session_with_bad_frame(
    meter: SimulatedDlmsMeter, clock: ManualClock, fault: str
) -> None:
    async with session(meter, clock) as s:
        if fault == "drop":
            meter.faults.drop_after_bytes = 13
        else:
            meter.faults.corrupt = True
        with pytest.raises((BadFrame, Timeout)) as info:
            await s.read_clock()
        if ENDPOINTS[id(meter)][0] == "wrapper" or fault == "corrupt":
            # On a serial line a cut answer is silence: only a timeout can tell it.
            assert isinstance(info.value, BadFrame) and info.value.raw


async def test_hls_gmac_association_reads_and_switches_ciphered(
    meter: SimulatedDlmsMeter, clock: ManualClock, tmp_path: Path
) -> None:
    counters = InvocationCounters(tmp_path / "ic.sqlite")
    async with hls_session(meter, clock, counters, DEFAULT_KEYS) as s:
        assert s.protection is not None and s.protection.peer_counter >= 0
        assert await s.read_clock() == NOW
        (energy,) = await s.read_registers([A_PLUS])
        assert energy.raw == meter.register_value(A_PLUS, clock.now())
        assert len(await s.read_profile(PROFILE, NOW - timedelta(hours=6), NOW)) == 24 * 4
        await s.operate_relay(RelayAction.DISCONNECT)
        assert await s.read_relay() == RelayState.DISCONNECTED
    assert meter.associations == 1
    counters.close()


async def test_hls_gmac_with_a_wrong_key_is_refused_cleanly(
    meter: SimulatedDlmsMeter, clock: ManualClock, tmp_path: Path
) -> None:
    counters = InvocationCounters(tmp_path / "ic.sqlite")
    wrong = codec.Keys(bytes(16), DEFAULT_KEYS.authentication)
    with pytest.raises(Refused, match="association rejected: authentication_failed"):
        async with hls_session(meter, clock, counters, wrong):
            pass
    assert meter.associations == 0
    assert "hidden" in repr(wrong) and wrong.encryption.hex() not in repr(wrong)
    counters.close()


async def test_invocation_counters_persist_and_never_repeat(
    meter: SimulatedDlmsMeter, clock: ManualClock, tmp_path: Path
) -> None:
    counters = InvocationCounters(tmp_path / "ic.sqlite")
    async with hls_session(meter, clock, counters, DEFAULT_KEYS) as s:
        await s.read_clock()
    used = counters.reserve("M-1")
    counters.close()
    reopened = InvocationCounters(tmp_path / "ic.sqlite")  # a restart of the head-end
    assert reopened.reserve("M-1") == used + 1
    async with hls_session(meter, clock, reopened, DEFAULT_KEYS) as s:
        assert await s.read_clock() == NOW
    reopened.close()


def test_invocation_counters_increase_across_processes_sharing_the_store(tmp_path: Path) -> None:
    """`headend commission` and `headend serve` share the file: whichever asks next gets the
    next counter, so a meter (and every meter sharing the global keys) sees one increasing
    sequence. (Reserving blocks per process to save fsyncs broke this: the meter refused the
    server's requests after a commissioning run.)"""
    serve, commission = InvocationCounters(tmp_path / "ic.sqlite"), InvocationCounters(tmp_path / "ic.sqlite")
    handed = [store.reserve("M-1") for _ in range(50) for store in (serve, commission)]
    assert handed == sorted(handed) and len(set(handed)) == len(handed)
    serve.close()
    commission.close()


def test_a_replayed_or_tampered_ciphered_apdu_is_refused() -> None:
    counter = iter(range(100))
    sender = Protection(DEFAULT_KEYS, b"CLIENT01", b"METER001", lambda: next(counter))
    receiver = Protection(DEFAULT_KEYS, b"METER001", b"CLIENT01", lambda: 0)
    apdu = xdlms.GetRequest(0xC1, xdlms.Attribute(8, Obis(0, 0, 1, 0, 0), 2)).to_bytes()
    first = sender.wrap(apdu)
    assert first[0] == 0xC8 and receiver.unwrap(first) == apdu  # glo-get-request; a counter of 0 is fine
    with pytest.raises(ProtectionError, match="not above 0: a replay"):
        receiver.unwrap(first)
    tampered = bytearray(sender.wrap(apdu))
    tampered[-1] ^= 1
    with pytest.raises(ProtectionError, match="wrong keys or a tampered frame"):
        receiver.unwrap(bytes(tampered))


def hls_session(
    meter: SimulatedDlmsMeter, clock: ManualClock, counters: InvocationCounters, keys: codec.Keys
) -> DlmsSession:
    return session(meter, clock, authentication="hls-gmac", password=None, keys=keys, counters=counters)


async def test_a_meter_that_never_stops_sending_blocks_is_cut_off(
    meter: SimulatedDlmsMeter, clock: ManualClock
) -> None:
    """Memory stays bounded by the byte cap, time by the session deadline; both end the session
    with a clear error, and the meter still answers a fresh session afterwards."""
    meter.faults.endless_blocks = True
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(BadFrame, match="no end in sight"):
        async with session(meter, clock, max_get_bytes=256 * 1024) as s:
            await s.read_clock()
    with pytest.raises(Timeout, match=r"session deadline \(0.5 s\) passed"):
        async with session(meter, clock, session_deadline=0.5) as s:
            await s.read_clock()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 50_000  # KiB
    meter.faults.repeat_block_number = True  # block 1 again and again, with no data
    with pytest.raises(BadFrame, match="block 1 where block 2 was due"):
        async with session(meter, clock) as s:
            await s.read_clock()
    meter.faults.endless_blocks = meter.faults.repeat_block_number = False
    async with session(meter, clock) as s:
        assert await s.read_clock() == NOW


async def test_invocation_counters_belong_to_a_system_title_and_key(tmp_path: Path) -> None:
    from headend.installation import dlms_system_title

    title = dlms_system_title(tmp_path / "state")
    assert len(title) == 8 and title.startswith(b"HED") and dlms_system_title(tmp_path / "state") == title
    assert dlms_system_title(tmp_path / "other") != title, "another installation has its own"
    assert dlms_system_title(tmp_path / "state", "4142434445464748") == b"ABCDEFGH"
    counters = InvocationCounters(tmp_path / "ic.sqlite")
    shared = counters.scope(title, b"k" * 32)
    first, second = counters.reserve(shared), counters.reserve(shared)  # two meters with the same global keys
    assert second == first + 1, "one sequence per (system title, key): no nonce twice under a key"
    other = counters.reserve(counters.scope(title, b"q" * 32))
    assert other > second, "a new sequence starts above every counter handed out before"
    counters.close()


async def test_a_session_cancelled_while_it_releases_closes_its_connection(
    meter: SimulatedDlmsMeter, clock: ManualClock
) -> None:
    """A stopping runner cancels a session in its release: the connection is closed then and
    there, not left to the garbage collector (an unclosed socket per cancelled session)."""
    s = session(meter, clock)
    released = asyncio.Event()

    async def use() -> None:
        async with s:
            await s.read_clock()
            meter.faults.delay = 5.0  # the release request waits for an answer that is slow to come
            released.set()

    task = asyncio.create_task(use())
    await released.wait()
    await asyncio.sleep(0)  # into the release exchange
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not s.transport.is_open
    meter.faults.delay = 0.0


async def test_bytes_after_a_get_answer_fail_the_read_unless_the_link_is_lenient(
    meter: SimulatedDlmsMeter, clock: ManualClock
) -> None:
    """Issue #16: the Gurux C example server sends 11 bytes after a profile's last block.
    Strict by default (the standard's way); a lenient link logs, counts and passes over them."""
    meter.faults.trailing_bytes = bytes(11)
    with pytest.raises(BadFrame, match="11 bytes left after the value"):
        async with session(meter, clock) as s:
            await s.read_profile(PROFILE, NOW - timedelta(days=2), NOW)
    before = client_module.trailing_bytes_ignored["M-1"]
    async with session(meter, clock, lenient=True) as s:
        rows = await s.read_profile(PROFILE, NOW - timedelta(days=2), NOW)
        assert await s.read_clock() == NOW
    assert len(rows) == 2 * 96 * 4
    assert client_module.trailing_bytes_ignored["M-1"] - before == 1


class CannedBlocks:
    """A transport that answers every GET with `data` in two blocks."""

    meter, where, is_open = "M1", "canned", True

    def __init__(self, data: bytes) -> None:
        self.data = data

    def bad(self, what: str, raw: bytes) -> BadFrame:
        return BadFrame(what, meter=self.meter, raw=raw)

    async def close(self) -> None:
        return None

    async def exchange(self, apdu: bytes) -> bytes:
        half = len(self.data) // 2
        if apdu[1] == 1:  # get-request-normal: the first block
            return xdlms.GetResult(apdu[2], data=self.data[:half], block_number=1, last_block=False).to_bytes()
        return xdlms.GetResult(apdu[2], data=self.data[half:], block_number=2, last_block=True).to_bytes()


@pytest.mark.parametrize(("data", "why"), [
    (bytes.fromhex("1200010005"), "a number followed by bytes: the number may be the wrong one"),
    (bytes.fromhex("010102020f010f02") + bytes.fromhex("02020f030f04"), "one more row than the count says"),
], ids=["scalar", "array-short-by-one"])  # fmt: skip
async def test_a_lenient_link_never_passes_over_what_may_be_part_of_the_value(data: bytes, why: str) -> None:
    session = DlmsSession(CannedBlocks(data), lenient=True)  # type: ignore[arg-type]
    with pytest.raises(BadFrame, match="bytes left after the value"):
        await session.get(7, PROFILE, 2)
    rows = bytes.fromhex("010102020f010f02") + bytes(11)  # the Gurux C server's tail: passed over
    assert await DlmsSession(CannedBlocks(rows), lenient=True).get(7, PROFILE, 2) == [[1, 2]]  # type: ignore[arg-type]
