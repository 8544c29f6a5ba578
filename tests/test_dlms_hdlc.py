"""DLMS over HDLC (IEC 62056-46): frames, a three-meter bus on a real pty pair, HDLC over TCP,
and the Gurux client speaking HDLC to the simulator."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import serial_asyncio_fast
from gurux_dlms import GXByteBuffer, GXDLMSClient, GXReplyData
from gurux_dlms.enums import Authentication, InterfaceType, Security
from gurux_dlms.objects import (
    GXDLMSAssociationLogicalName,
    GXDLMSClock,
    GXDLMSData,
    GXDLMSDisconnectControl,
    GXDLMSProfileGeneric,
    GXDLMSRegister,
)
from gurux_dlms.secure import GXDLMSSecureClient

from headend.config import ConfigError, SerialLink, parse_config
from headend.model import RelayAction, RelayState
from headend.protocols.base import Refused, Timeout
from headend.protocols.dlms import hdlc
from headend.protocols.dlms.client import DlmsSession
from headend.protocols.dlms.hdlc_link import FrameReader
from headend.protocols.dlms.security import InvocationCounters
from simulators.clock import ManualClock
from simulators.dlms_meter import A_PLUS, DEFAULT_KEYS, PROFILE, SERIAL, HdlcBus, SimulatedDlmsMeter
from simulators.ptypair import NullModem

NOW = datetime(2026, 3, 8, 6, 0, tzinfo=UTC)
PHYSICAL = (0x11, 0x12, 0x13)
ROOT = Path(__file__).resolve().parent.parent


def test_snrm_frame_matches_the_published_example() -> None:
    # The SNRM of the public client (SAP 16) to the management logical device, as printed in
    # the DLMS UA Green Book's HDLC examples and Gurux's documentation.
    frame = hdlc.Frame(hdlc.encode_address(1), hdlc.encode_address(16), hdlc.SNRM).to_bytes()
    assert frame == bytes.fromhex("7EA0070321930F017E")
    assert hdlc.parse(frame).control == hdlc.SNRM


def test_frames_round_trip_and_damage_is_detected() -> None:
    info = hdlc.LLC_REQUEST + bytes([0x7E]) * 5 + b"payload"
    raw = hdlc.Frame(hdlc.encode_address(1, 0x11), hdlc.encode_address(1), 0x10, info, True).to_bytes()
    parsed = hdlc.parse(raw)
    assert parsed.info == info and parsed.segmented
    assert hdlc.address_parts(parsed.destination) == (1, 0x11)
    broken = bytearray(raw)
    broken[-4] ^= 0xFF
    with pytest.raises(hdlc.HdlcError, match="FCS mismatch"):
        hdlc.parse(bytes(broken))
    with pytest.raises(hdlc.HdlcError, match="length field"):
        hdlc.parse(raw[:5] + raw[6:])


def test_frames_with_flag_bytes_inside_are_read_by_length() -> None:
    reader = FrameReader()
    frame = hdlc.Frame(hdlc.encode_address(1), hdlc.encode_address(16), 0x10, b"\x7e\x7e~inside~\x7e").to_bytes()
    reader.feed(b"\x00\x7e\x13 noise" + frame + frame)
    for _ in range(2):
        found = reader.next_frame()
        assert found is not None and found.info == b"\x7e\x7e~inside~\x7e"
    assert reader.next_frame() is None


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(NOW)


@pytest.fixture
def meters(clock: ManualClock) -> dict[int, SimulatedDlmsMeter]:
    return {p: SimulatedDlmsMeter(str(p), clock, seed=p, serial=f"SN~{p:02x}~") for p in PHYSICAL}


@pytest.fixture
async def serial_bus(meters: dict[int, SimulatedDlmsMeter]) -> AsyncIterator[tuple[HdlcBus, NullModem]]:
    with NullModem() as modem:
        bus = HdlcBus(meters)
        await bus.start_serial(modem.a, 9600)
        yield bus, modem
        await bus.stop()


@pytest.fixture
async def tcp_bus(meters: dict[int, SimulatedDlmsMeter]) -> AsyncIterator[HdlcBus]:
    """Meter 0x11 alone on an HDLC bus over TCP (`bus.port`)."""
    bus = HdlcBus({0x11: meters[0x11]})
    await bus.start_tcp()
    yield bus
    await bus.stop()


async def test_three_meters_on_one_serial_hdlc_bus(
    serial_bus: tuple[HdlcBus, NullModem], meters: dict[int, SimulatedDlmsMeter], clock: ManualClock
) -> None:
    _bus, modem = serial_bus
    for physical, meter in meters.items():
        async with DlmsSession.hdlc_serial(
            modem.b, f"M-{physical}", baudrate=9600, authentication="lls", password=b"12345678",
            server_physical=physical, timeout=3, now=clock.datetime,
        ) as s:  # fmt: skip
            assert await s.read_clock() == NOW
            (energy,) = await s.read_registers([A_PLUS])
            assert energy.raw == meter.register_value(A_PLUS, clock.now())
            assert await s.get(1, SERIAL, 2) == f"SN~{physical:02x}~"  # 0x7E inside the frame
            day = await s.read_profile(PROFILE, NOW - timedelta(days=1), NOW)  # many HDLC segments
            assert len(day) == 96 * 4
            await s.operate_relay(RelayAction.DISCONNECT)
            assert await s.read_relay() == RelayState.DISCONNECTED
        assert meter.control_state == 0 and meter.associations == 1


async def test_a_meter_that_is_not_on_the_bus_stays_silent(serial_bus: tuple[HdlcBus, NullModem]) -> None:
    _bus, modem = serial_bus
    with pytest.raises(Timeout):
        async with DlmsSession.hdlc_serial(modem.b, "M-ghost", server_physical=0x40, timeout=0.5):
            pass


async def test_hdlc_over_tcp(tcp_bus: HdlcBus) -> None:
    async with DlmsSession.hdlc_tcp("127.0.0.1", tcp_bus.port, "M-11", server_physical=0x11, timeout=3) as s:
        assert await s.read_clock() == NOW


def test_a_physical_address_above_127_is_a_four_byte_address_as_gurux_writes_it() -> None:
    """Issue #16: meters addressed by serial number have physical addresses up to 16,383."""
    ours = hdlc.encode_address(1, 4567)
    assert len(ours) == 4 and hdlc.address_parts(ours) == (1, 4567)
    assert hdlc.encode_address(1, 0x11) == bytes([2, 0x23])  # two bytes while both parts fit
    gurux = GXDLMSClient(True, 16, GXDLMSClient.getServerAddress(1, 4567), Authentication.NONE, None,
                         InterfaceType.HDLC)  # fmt: skip
    snrm = hdlc.parse(bytes(gurux.snrmRequest()))
    assert snrm.destination == ours and snrm.control == hdlc.SNRM
    with pytest.raises(ValueError, match=r"0\.\.16383"):
        hdlc.encode_address(1, 16384)


async def test_a_meter_at_a_four_byte_hdlc_address_is_read(clock: ManualClock) -> None:
    meter = SimulatedDlmsMeter("M-4567", clock)
    bus = HdlcBus({4567: meter})
    port = await bus.start_tcp()
    try:
        async with DlmsSession.hdlc_tcp("127.0.0.1", port, "M-4567", server_physical=4567, timeout=3) as s:
            assert await s.read_clock() == NOW
        cfg = parse_config({"links": [{"id": "bus", "kind": "tcp", "protocol": "dlms-hdlc", "host": "127.0.0.1",
                                       "port": port}],
                            "meters": [{"id": "M-4567", "link": "bus", "dlms": {"physical": 4567}}]})  # fmt: skip
        assert cfg.meters[0].dlms.physical == 4567
    finally:
        await bus.stop()


class GuruxHdlc:
    """A Gurux client speaking HDLC over one TCP connection, a step at a time."""

    def __init__(self, port: int, password: str | None, physical: int = 0x11) -> None:
        """`password` "hls": HLS-GMAC with the simulator's keys."""
        server = GXDLMSClient.getServerAddress(1, physical)
        if password == "hls":
            self.client = GXDLMSSecureClient(True, 1, server, Authentication.HIGH_GMAC, None, InterfaceType.HDLC)
            cipher = self.client.settings.cipher
            cipher.security = Security.AUTHENTICATION_ENCRYPTION
            cipher.systemTitle = bytearray(b"GURUXCLI")
            cipher.blockCipherKey = bytearray(DEFAULT_KEYS.encryption)
            cipher.authenticationKey = bytearray(DEFAULT_KEYS.authentication)
        else:
            auth = Authentication.LOW if password else Authentication.NONE
            self.client = GXDLMSClient(True, 1 if password else 16, server, auth, password, InterfaceType.HDLC)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=2)

    def run(self, frames: list[bytes] | bytes) -> GXReplyData:
        reply = GXReplyData()
        for frame in frames if isinstance(frames, list) else [frames]:
            self.sock.sendall(frame)
            buf = GXByteBuffer()
            while not self.client.getData(buf, reply, None):
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise ConnectionError("the meter closed the connection")
                buf.set(chunk)
        while reply.isMoreData():
            self.sock.sendall(self.client.receiverReady(reply))
            buf = GXByteBuffer()
            while not self.client.getData(buf, reply, None):
                buf.set(self.sock.recv(4096))
        return reply

    def connect(self) -> None:
        self.client.parseUAResponse(self.run(self.client.snrmRequest()).data)
        self.client.parseAareResponse(self.run(self.client.aarqRequest()).data)
        if self.client.getIsAuthenticationRequired():
            request = self.client.getApplicationAssociationRequest()
            self.client.parseApplicationAssociationResponse(self.run(request).data)

    def read(self, obj: Any, attribute: int) -> Any:
        self.client.updateValue(obj, attribute, self.run(self.client.read(obj, attribute)).value)
        return obj

    def clock(self) -> object:
        return self.read(GXDLMSClock("0.0.1.0.0.255"), 2).time.value

    def close(self) -> None:
        self.sock.close()


def gurux_over_hdlc(port: int, max_info: int | None = None) -> dict[str, object]:
    g = GuruxHdlc(port, "12345678")
    if max_info is not None:
        g.client.hdlcSettings.maxInfoRX = g.client.hdlcSettings.maxInfoTX = max_info
    try:
        g.connect()
        out: dict[str, object] = {"negotiated": (g.client.hdlcSettings.maxInfoTX, g.client.hdlcSettings.maxInfoRX)}
        out["captured"] = len(g.read(GXDLMSProfileGeneric("1.0.99.1.0.255"), 3).captureObjects)
        out["clock"] = g.clock()
        out["energy"] = g.read(g.read(GXDLMSRegister("1.0.1.8.0.255"), 3), 2).value
        out["serial"] = g.read(GXDLMSData("0.0.96.1.0.255"), 2).value
        g.run(g.client.releaseRequest())
        g.run(g.client.disconnectRequest())
        return out
    finally:
        g.close()


async def test_gurux_speaks_hdlc_to_the_simulator(
    tcp_bus: HdlcBus, meters: dict[int, SimulatedDlmsMeter], clock: ManualClock
) -> None:
    got = await asyncio.to_thread(gurux_over_hdlc, tcp_bus.port)
    assert got["clock"].replace(tzinfo=None) == NOW.replace(tzinfo=None)  # type: ignore[attr-defined]
    assert got["energy"] == meters[0x11].register_value(A_PLUS, clock.now())
    assert got["serial"] == "SN~11~"
    assert tcp_bus.bad_frames == 0


async def test_the_simulator_keeps_to_the_hdlc_frame_size_the_client_negotiated(
    tcp_bus: HdlcBus, meters: dict[int, SimulatedDlmsMeter], clock: ManualClock
) -> None:
    """Issue #16: the UA always said 128/128 and 129-byte frames came whatever the client
    proposed; now the UA answers the client's sizes and every frame keeps to them."""
    got = await asyncio.to_thread(gurux_over_hdlc, tcp_bus.port, 32)
    assert got["negotiated"] == (32, 32) and got["captured"] == 6
    assert got["energy"] == meters[0x11].register_value(A_PLUS, clock.now())
    assert 0 < tcp_bus.largest_info <= 32 and tcp_bus.bad_frames == 0


async def test_sessions_come_from_the_config_with_the_password_from_the_environment(
    serial_bus: tuple[HdlcBus, NullModem], meters: dict[int, SimulatedDlmsMeter], clock: ManualClock
) -> None:
    _bus, modem = serial_bus
    wrapper_meter = SimulatedDlmsMeter("w", clock, password=b"wrapperpw")
    await wrapper_meter.start()
    cfg = parse_config(
        {
            "links": [
                {"id": "rs485", "kind": "serial", "protocol": "dlms-hdlc", "device": modem.b, "timeout": "3s"},
                {"id": "tcp", "kind": "tcp", "protocol": "dlms-wrapper", "host": "127.0.0.1",
                 "port": wrapper_meter.port},
            ],
            "meters": [
                {"id": "H-12", "link": "rs485", "dlms": {"authentication": "lls", "password_env": "PW_BUS",
                                                        "physical": 0x12}, "ct": {"primary": 100, "secondary": 5}},
                {"id": "W-1", "link": "tcp", "dlms": {"authentication": "lls", "password_env": "PW_W"}},
            ],
        }
    )  # fmt: skip
    links = {link.id: link for link in cfg.links}
    env = {"PW_BUS": "12345678", "PW_W": "wrapperpw"}
    hdlc_meter, tcp_meter = cfg.meters
    async with DlmsSession.from_config(hdlc_meter, links["rs485"], env, now=clock.datetime) as s:  # type: ignore[arg-type]
        (energy,) = await s.read_registers([A_PLUS])
        assert energy.value == pytest.approx(meters[0x12].register_value(A_PLUS, clock.now()) / 1000 * 20)
    async with DlmsSession.from_config(tcp_meter, links["tcp"], env) as s:  # type: ignore[arg-type]
        assert await s.read_clock() == NOW
    with pytest.raises(Refused, match="PW_W is not set"):
        DlmsSession.from_config(tcp_meter, links["tcp"], {})  # type: ignore[arg-type]
    await wrapper_meter.stop()


def test_lls_without_a_password_variable_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="needs password_env"):
        parse_config({"links": [{"id": "t", "kind": "tcp", "protocol": "dlms-wrapper", "host": "h", "port": 4059}],
                      "meters": [{"id": "M", "link": "t", "dlms": {"authentication": "lls"}}]})  # fmt: skip


async def test_an_hls_gmac_meter_from_the_config_with_keys_from_the_environment(
    serial_bus: tuple[HdlcBus, NullModem], clock: ManualClock, tmp_path: Path
) -> None:
    _bus, modem = serial_bus
    cfg = parse_config(
        {
            "links": [{"id": "rs485", "kind": "serial", "protocol": "dlms-hdlc", "device": modem.b, "timeout": "3s"}],
            "meters": [{"id": "H-13", "link": "rs485", "dlms": {
                "authentication": "hls-gmac", "encryption_key_env": "EK", "authentication_key_env": "AK",
                "physical": 0x13}}],
        }
    )  # fmt: skip
    link = cfg.links[0]
    assert isinstance(link, SerialLink)
    env = {"EK": DEFAULT_KEYS.encryption.hex(), "AK": DEFAULT_KEYS.authentication.hex()}
    counters = InvocationCounters(tmp_path / "ic.sqlite")
    async with DlmsSession.from_config(cfg.meters[0], link, env, counters=counters, now=clock.datetime) as s:
        assert s.protection is not None
        assert await s.read_clock() == NOW
    with pytest.raises(Refused, match="32 hex digits"):
        DlmsSession.from_config(cfg.meters[0], link, {"EK": "00", "AK": "11"}, counters=counters)
    counters.close()


async def test_the_simulator_runs_as_its_own_process_on_an_hdlc_pty() -> None:
    with NullModem() as modem:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "simulators.dlms_meter", "--meters", "2", "--hdlc-serial", modem.a,
            "--baudrate", "19200", cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            for _ in range(2):
                assert b"HDLC physical address" in await proc.stdout.readline()
            async with DlmsSession.hdlc_serial(modem.b, "M-12", baudrate=19200, server_physical=0x12, timeout=3) as s:
                assert await s.get(1, SERIAL, 2) == "SIM00000002"
        finally:
            proc.terminate()
            await proc.wait()


def hijack_over_hdlc(port: int) -> str:
    """An LLS client associates and goes without releasing; a new connection, with no SNRM,
    no AARQ and no password, sends remote_disconnect in the first client's name."""
    owner = GuruxHdlc(port, "12345678")
    owner.connect()
    owner.close()
    intruder = GuruxHdlc(port, None)
    intruder.client = owner.client  # the same addresses and sequence numbers as the one that left
    try:
        reply = intruder.run(GXDLMSDisconnectControl("0.0.96.3.10.255").remoteDisconnect(intruder.client))
        return f"answered: error {reply.error}"
    except Exception as exc:  # noqa: BLE001 - Gurux raises its own types for a DM
        return f"refused: {type(exc).__name__}: {exc}"
    finally:
        intruder.close()


async def test_an_association_never_outlives_its_connection_a_new_one_cannot_switch_in_its_name(
    tcp_bus: HdlcBus, meters: dict[int, SimulatedDlmsMeter]
) -> None:
    outcome = await asyncio.to_thread(hijack_over_hdlc, tcp_bus.port)
    # Gurux gets the meter's DM (disconnected mode) as an error code of its own (-4) or raises.
    assert not outcome.endswith("error 0"), outcome
    assert meters[0x11].actions == 0 and meters[0x11].control_state == 1  # the relay never moved


def two_clients_at_once(port: int) -> list[object]:
    """Two connections with the same client address, their frames interleaved."""
    first, second = GuruxHdlc(port, "12345678"), GuruxHdlc(port, "12345678")
    try:
        first.client.parseUAResponse(first.run(first.client.snrmRequest()).data)
        second.client.parseUAResponse(second.run(second.client.snrmRequest()).data)
        first.client.parseAareResponse(first.run(first.client.aarqRequest()).data)
        second.client.parseAareResponse(second.run(second.client.aarqRequest()).data)
        return [first.clock(), second.clock(), first.clock(), second.clock()]
    finally:
        first.close()
        second.close()


async def test_two_connections_with_one_client_address_keep_their_own_hdlc_sequence(
    tcp_bus: HdlcBus,
) -> None:
    clocks = await asyncio.to_thread(two_clients_at_once, tcp_bus.port)
    assert [c.replace(tzinfo=None) for c in clocks] == [NOW.replace(tzinfo=None)] * 4  # type: ignore[attr-defined]
    assert tcp_bus.bad_frames == 0


def object_list_over_hdlc(port: int, password: str | None) -> tuple[int, int, int]:
    g = GuruxHdlc(port, password)
    try:
        g.connect()
        association = g.read(GXDLMSAssociationLogicalName("0.0.40.0.0.255"), 2)
        profile = g.read(GXDLMSProfileGeneric("1.0.99.1.0.255"), 7)
        clock = next(o for o in association.objectList if o.logicalName == "0.0.1.0.0.255")
        return len(association.objectList), int(profile.entriesInUse), int(clock.getAccess(2))
    finally:
        g.close()


@pytest.mark.parametrize("password", [None, "12345678", "hls"], ids=["public", "lls", "hls-gmac"])
async def test_gurux_reads_the_object_list_over_hdlc(
    tcp_bus: HdlcBus, password: str | None
) -> None:
    objects, in_use, clock_access = await asyncio.to_thread(object_list_over_hdlc, tcp_bus.port, password)
    assert objects >= 20 and in_use > 0 and clock_access == (3 if password else 1)


async def test_a_serial_bus_keeps_serving_after_a_client_proposes_zero_byte_frames(
    serial_bus: tuple[HdlcBus, NullModem], clock: ManualClock
) -> None:
    """Issue #16's attacker pass: an SNRM offering 0-byte frames killed the bus's one task,
    and every meter on the line went silent."""
    bus, modem = serial_bus
    _reader, writer = await serial_asyncio_fast.open_serial_connection(url=modem.b, baudrate=9600)
    meter = hdlc.encode_address(1, 0x11)
    writer.write(hdlc.Frame(meter, hdlc.encode_address(16), hdlc.SNRM, hdlc.snrm_parameters(0)).to_bytes())
    await writer.drain()
    writer.close()
    async with DlmsSession.hdlc_serial(modem.b, "M-11", server_physical=0x11, timeout=3, now=clock.datetime) as s:
        assert await s.read_clock() == NOW
    assert bus.bad_frames >= 1
