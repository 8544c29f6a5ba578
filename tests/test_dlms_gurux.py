"""Interoperability: the Gurux DLMS client (gurux-dlms from PyPI, written by others) against
the project's DLMS meter simulator over the TCP wrapper."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
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

from headend.protocols.dlms import codec
from simulators.clock import ManualClock
from simulators.dlms_meter import A_PLUS, CIPHER_OVERHEAD, DEFAULT_KEYS, SimulatedDlmsMeter

NOW = datetime(2026, 3, 8, 6, 0, tzinfo=UTC)


class GuruxSession:
    """Gurux builds and parses the frames; this moves them over a socket."""

    def __init__(self, port: int, password: str | None, *, secure: bool = False) -> None:
        auth = Authentication.LOW if password else Authentication.NONE
        kind = GXDLMSSecureClient if secure else GXDLMSClient
        self.client = kind(True, 1 if password else 16, 1, auth, password, InterfaceType.WRAPPER)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)

    def _exchange(self, frame: bytes, reply: GXReplyData) -> None:
        self.sock.sendall(frame)
        buf = GXByteBuffer()
        while not self.client.getData(buf, reply, None):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("meter closed the connection")
            buf.set(chunk)

    def run(self, frames: list[bytes]) -> GXReplyData:
        reply = GXReplyData()
        for frame in frames:
            self._exchange(frame, reply)
        while reply.isMoreData():
            self._exchange(self.client.receiverReady(reply), reply)
        return reply

    def associate(self) -> None:
        self.client.parseAareResponse(self.run(self.client.aarqRequest()).data)

    def read(self, obj: Any, attribute: int) -> Any:
        self.client.updateValue(obj, attribute, self.run(self.client.read(obj, attribute)).value)
        return obj

    def close(self) -> None:
        self.run(self.client.releaseRequest())
        self.sock.close()


@pytest.fixture
async def meter() -> AsyncIterator[SimulatedDlmsMeter]:
    m = SimulatedDlmsMeter("1", ManualClock(NOW), block_size=512)
    await m.start()
    yield m
    await m.stop()


def gurux_reads(port: int) -> dict[str, Any]:
    g = GuruxSession(port, "12345678")
    g.associate()
    out: dict[str, Any] = {}
    clock = g.read(GXDLMSClock("0.0.1.0.0.255"), 2)
    out["clock"] = clock.time.value
    register = g.read(g.read(GXDLMSRegister("1.0.1.8.0.255"), 3), 2)
    out["register"] = (register.value, register.scaler, register.unit)
    profile = g.read(GXDLMSProfileGeneric("1.0.99.1.0.255"), 3)
    out["capture"] = [(o.logicalName, a.attributeIndex) for o, a in profile.captureObjects]
    start, end = NOW - timedelta(days=1), NOW
    g.client.updateValue(profile, 2, g.run(g.client.readRowsByRange(profile, start, end)).value)
    out["rows"] = [(row[0].value, row[2]) for row in profile.buffer]
    dc = GXDLMSDisconnectControl("0.0.96.3.10.255")
    g.run(dc.remoteDisconnect(g.client))
    out["after_disconnect"] = g.read(dc, 3).controlState
    g.run(dc.remoteReconnect(g.client))
    out["after_reconnect"] = g.read(dc, 3).controlState
    g.close()
    return out


async def test_gurux_client_reads_and_switches_the_simulator(meter: SimulatedDlmsMeter) -> None:
    got = await asyncio.to_thread(gurux_reads, meter.port)
    assert got["clock"].replace(tzinfo=None) == NOW.replace(tzinfo=None)
    value, scaler, unit = got["register"]
    assert value == meter.register_value(A_PLUS, NOW.timestamp()) and scaler == 1.0 and unit == 30
    assert got["capture"][0] == ("0.0.1.0.0.255", 2) and len(got["capture"]) == 6
    # A range is inclusive at both ends: the day's 96 intervals plus the row at its start.
    assert len(got["rows"]) == 97
    for stamp, energy in got["rows"]:
        assert energy == meter.register_value(A_PLUS, stamp.replace(tzinfo=UTC).timestamp())
    assert int(got["after_disconnect"]) == 0 and int(got["after_reconnect"]) == 1
    assert meter.associations == 1


async def test_gurux_is_refused_with_a_wrong_password(meter: SimulatedDlmsMeter) -> None:
    def attempt() -> None:
        g = GuruxSession(meter.port, "wrong!!!")
        try:
            g.associate()
        finally:
            g.sock.close()

    with pytest.raises(Exception, match=r"(?i)authentication|reject"):
        await asyncio.to_thread(attempt)
    assert meter.associations == 0


def hls_gmac_session(port: int, keys: codec.Keys, max_pdu: int | None = None) -> GuruxSession:
    """A Gurux session set up for HLS-GMAC with these keys, associated."""
    g = GuruxSession(port, None, secure=True)
    if max_pdu is not None:
        g.client.maxReceivePDUSize = max_pdu
    g.client.authentication = Authentication.HIGH_GMAC
    g.client.clientAddress = 1
    cipher = g.client.settings.cipher
    cipher.security = Security.AUTHENTICATION_ENCRYPTION
    cipher.systemTitle = bytearray(b"GURUXCLI")
    cipher.blockCipherKey = bytearray(keys.encryption)
    cipher.authenticationKey = bytearray(keys.authentication)
    try:
        g.client.parseAareResponse(g.run(g.client.aarqRequest()).data)
        if g.client.getIsAuthenticationRequired():
            g.client.parseApplicationAssociationResponse(g.run(g.client.getApplicationAssociationRequest()).data)
    except BaseException:
        g.sock.close()
        raise
    return g


def gurux_hls_gmac(port: int, keys: codec.Keys) -> dict[str, Any]:
    g = hls_gmac_session(port, keys)
    try:
        clock = g.read(GXDLMSClock("0.0.1.0.0.255"), 2)
        register = g.read(g.read(GXDLMSRegister("1.0.1.8.0.255"), 3), 2)
        g.close()
        return {"clock": clock.time.value, "energy": register.value}
    finally:
        g.sock.close()


async def test_gurux_associates_with_hls_gmac_and_reads_ciphered(meter: SimulatedDlmsMeter) -> None:
    got = await asyncio.to_thread(gurux_hls_gmac, meter.port, DEFAULT_KEYS)
    assert got["clock"].replace(tzinfo=None) == NOW.replace(tzinfo=None)
    assert got["energy"] == meter.register_value(A_PLUS, NOW.timestamp())
    assert meter.associations == 1


async def test_gurux_with_a_wrong_key_is_refused(meter: SimulatedDlmsMeter) -> None:
    wrong = codec.Keys(bytes(16), DEFAULT_KEYS.authentication)
    with pytest.raises(Exception):  # noqa: B017 - Gurux raises its own exception types
        await asyncio.to_thread(gurux_hls_gmac, meter.port, wrong)
    assert meter.associations == 0


def gurux_reads_events_and_identity(port: int) -> dict[str, Any]:
    g = GuruxSession(port, "12345678")
    g.associate()
    out: dict[str, Any] = {}
    log = g.read(GXDLMSProfileGeneric("0.0.99.98.0.255"), 3)
    out["capture"] = [(o.logicalName, a.attributeIndex) for o, a in log.captureObjects]
    g.client.updateValue(log, 2, g.run(g.client.readRowsByRange(log, NOW - timedelta(days=1), NOW)).value)
    out["events"] = [(row[0].value, row[1]) for row in log.buffer]
    out["ct"] = [g.read(GXDLMSData(name), 2).value for name in ("1.0.0.4.2.255", "1.0.0.4.5.255")]
    out["serial"] = g.read(GXDLMSData("0.0.96.1.0.255"), 2).value
    g.close()
    return out


async def test_gurux_reads_the_event_log_ratios_and_serial_the_head_end_reads(meter: SimulatedDlmsMeter) -> None:
    """The objects commissioning and the events plan read, as an independent client sees them."""
    outage = (NOW - timedelta(hours=3), NOW - timedelta(hours=2))
    meter.power_outage(*outage)
    meter.ct = (200, 5)
    got = await asyncio.to_thread(gurux_reads_events_and_identity, meter.port)
    assert got["capture"] == [("0.0.1.0.0.255", 2), ("0.0.96.11.0.255", 2)]
    assert [(t.replace(tzinfo=UTC), int(code)) for t, code in got["events"]] == [(outage[0], 1), (outage[1], 2)]
    assert [int(v) for v in got["ct"]] == [200, 5]
    assert str(got["serial"]) == meter.serial


def gurux_writes(port: int, password: str | None) -> dict[str, int]:
    """Gurux writes the clock (writable by a logged-in client) and the energy register (read
    only); the answer to each: 0 or the data-access-result Gurux raised."""
    g = GuruxSession(port, password)
    g.associate()
    out: dict[str, int] = {}
    clock = g.read(GXDLMSClock("0.0.1.0.0.255"), 2)
    register = g.read(g.read(GXDLMSRegister("1.0.1.8.0.255"), 3), 2)
    for name, obj in (("clock", clock), ("register", register)):
        out[name] = int(g.run(g.client.write(obj, 2)).error)  # Gurux gives the result, it does not raise
    out["missing"] = int(g.run(g.client.read(GXDLMSData("0.0.96.99.99.255"), 2)).error)  # no such object
    out["after"] = int(g.read(GXDLMSRegister("1.0.1.8.0.255"), 2).value)  # the association goes on
    g.close()
    return out


async def test_gurux_writes_what_its_association_may_and_is_denied_the_rest(meter: SimulatedDlmsMeter) -> None:
    """Issue #16: the public client could SET the clock and the control mode, and a SET of a
    read-only attribute answered object-undefined; a missing object then another GET works."""
    public = await asyncio.to_thread(gurux_writes, meter.port, None)
    assert public["clock"] == 3 and public["register"] == 3  # read-write-denied: the public client reads only
    assert public["missing"] == 4 and public["after"] == meter.register_value(A_PLUS, NOW.timestamp())
    lls = await asyncio.to_thread(gurux_writes, meter.port, "12345678")
    assert lls["clock"] == 0  # the logged-in client sets the clock
    assert lls["register"] == 3  # there and readable, not writable: read-write-denied, not object-undefined
    assert lls["missing"] == 4


def gurux_reads_a_day_taking_64_byte_apdus(port: int, hls: bool) -> list[tuple[datetime, Any]]:
    if hls:
        g = hls_gmac_session(port, DEFAULT_KEYS, max_pdu=64)
    else:
        g = GuruxSession(port, "12345678")
        g.client.maxReceivePDUSize = 64
        g.associate()
    profile = g.read(GXDLMSProfileGeneric("1.0.99.1.0.255"), 3)
    g.client.updateValue(profile, 2, g.run(g.client.readRowsByRange(profile, NOW - timedelta(days=1), NOW)).value)
    g.close()
    return [(row[0].value, row[2]) for row in profile.buffer]


@pytest.mark.parametrize("hls", [False, True], ids=["lls", "hls-gmac"])
async def test_the_simulator_never_sends_a_client_more_than_its_max_pdu(meter: SimulatedDlmsMeter, hls: bool) -> None:
    """Issue #16: a client that takes 64-byte APDUs was sent 1,036 bytes at once (ciphered:
    the ciphering's bytes count too)."""
    rows = await asyncio.to_thread(gurux_reads_a_day_taking_64_byte_apdus, meter.port, hls)
    assert len(rows) == 97
    for stamp, energy in rows:
        assert energy == meter.register_value(A_PLUS, stamp.replace(tzinfo=UTC).timestamp())
    assert 0 < meter.largest_reply <= 64 - (CIPHER_OVERHEAD if hls else 0)


def gurux_walks_the_object_list(port: int, password: str | None) -> dict[str, Any]:
    """The object list (0-0:40.0.0.255, attribute 2), then every listed object's attribute 2;
    a profile's attributes 3-8 and its rows by entry. `password` "hls": HLS-GMAC."""
    if password == "hls":
        g = hls_gmac_session(port, DEFAULT_KEYS)
    else:
        g = GuruxSession(port, password)
        g.associate()
    association = g.read(GXDLMSAssociationLogicalName("0.0.40.0.0.255"), 2)
    out: dict[str, Any] = {"listed": {}, "errors": {}, "profiles": {}}
    for obj in association.objectList:
        out["listed"][obj.logicalName] = (int(obj.objectType), int(obj.getAccess(2)))
        if obj.logicalName == "0.0.1.0.0.255":  # what the meter does not do is listed as no access
            out["clock_unlisted"] = (int(obj.getAccess(4)), int(obj.getMethodAccess(1)))
        if isinstance(obj, GXDLMSProfileGeneric):
            for attribute in range(3, 9):
                g.read(obj, attribute)
            first_two = g.run(g.client.readRowsByEntry(obj, 1, 2)).value
            g.client.updateValue(obj, 2, first_two)
            by_entry = [list(row) for row in obj.buffer]
            in_use = obj.entriesInUse
            out["profiles"][obj.logicalName] = {
                "capture": len(obj.captureObjects), "sort": int(obj.sortMethod), "in_use": in_use,
                "entries": obj.profileEntries, "by_entry": by_entry,
            }  # fmt: skip
            continue
        error = int(g.run(g.client.read(obj, 2)).error)
        if error:
            out["errors"][obj.logicalName] = error
    g.close()
    return out


@pytest.mark.parametrize("password", [None, "12345678", "hls"], ids=["public", "lls", "hls-gmac"])
async def test_gurux_reads_the_object_list_and_every_object_it_lists(
    meter: SimulatedDlmsMeter, password: str | None
) -> None:
    """Issue #16: a tool starts from the association's object list; every object it lists is
    readable, profiles answer attributes 3-8 and reads by entry, the access rights are the
    association's (the public client may write nothing)."""
    got = await asyncio.to_thread(gurux_walks_the_object_list, meter.port, password)
    listed = got["listed"]
    assert len(listed) >= 20 and got["errors"] == {}
    for name in ("0.0.1.0.0.255", "1.0.99.1.0.255", "0.0.99.98.0.255", "0.0.96.10.1.255", "0.0.96.11.0.255",
                 "0.0.96.3.10.255", "1.0.1.8.0.255"):  # fmt: skip
        assert name in listed, name
    assert got["clock_unlisted"] == (0, 0)  # Gurux reads an attribute or method left out as full access
    clock_access = listed["0.0.1.0.0.255"][1]
    assert clock_access == (3 if password else 1)  # read-write for the logged-in client, read-only for the public one
    load = got["profiles"]["1.0.99.1.0.255"]
    assert load["capture"] == 6 and load["sort"] == 1 and 0 < load["in_use"] <= load["entries"]
    assert len(load["by_entry"]) == 2
    oldest = meter.profile_rows(meter.installed, NOW)[0]
    assert load["by_entry"][0][2] == oldest[2].value  # +A of the oldest entry, as the meter keeps it
    assert set(got["profiles"]) == {"1.0.99.1.0.255", "0.0.99.98.0.255", "0.0.98.1.0.255", "0.0.98.2.0.255"}


def wrapper_hijack_and_two_at_once(port: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    owner = GuruxSession(port, "12345678")
    owner.associate()
    owner.sock.close()  # gone without releasing
    intruder = GuruxSession(port, None)
    intruder.client = owner.client  # speaks as if it were the associated client
    try:
        out["hijack"] = int(intruder.run(GXDLMSDisconnectControl("0.0.96.3.10.255").remoteDisconnect(
            intruder.client)).error)  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - Gurux raises its own types for an exception response
        out["hijack"] = f"{type(exc).__name__}: {exc}"
    finally:
        intruder.sock.close()
    first, second = GuruxSession(port, "12345678"), GuruxSession(port, "12345678")
    first.associate()
    second.associate()
    out["clocks"] = [s.read(GXDLMSClock("0.0.1.0.0.255"), 2).time.value for s in (first, second, first, second)]
    first.close()
    second.close()
    return out


async def test_the_wrapper_keeps_each_association_to_its_connection(meter: SimulatedDlmsMeter) -> None:
    """Issue #16 over the TCP wrapper: a new connection cannot act in the name of one that
    left without releasing, and two clients at once each keep their own association."""
    got = await asyncio.to_thread(wrapper_hijack_and_two_at_once, meter.port)
    assert got["hijack"] != 0 and meter.actions == 0 and meter.control_state == 1
    assert [c.replace(tzinfo=None) for c in got["clocks"]] == [NOW.replace(tzinfo=None)] * 4
