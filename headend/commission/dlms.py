"""Commissioning a DLMS/COSEM link: a meter on a TCP wrapper, or an HDLC bus (serial or TCP)."""

from __future__ import annotations

import asyncio
import time

from headend.commission.checks import Options, Progress, error_text, identity, ratio, session_checks, time_boxed
from headend.commission.report import Check, FoundMeter, Report
from headend.config import DlmsSettings, Meter, SerialLink, TcpLink
from headend.installation import dlms_system_title
from headend.model import Obis
from headend.protocols.base import LinkDown, MeterError, Refused, Timeout, Unsupported
from headend.protocols.dlms.client import DlmsSession
from headend.protocols.dlms.security import InvocationCounters
from headend.registry import Registry

SERIAL = Obis(0, 0, 96, 1, 0)
FIRMWARE = Obis(1, 0, 0, 2, 0)
DEVICE_NAME = Obis(0, 0, 42, 0, 0)
SAP_ASSIGNMENT = Obis(0, 0, 41, 0, 0)
CT_NUM, PT_NUM, CT_DEN, PT_DEN = Obis(1, 0, 0, 4, 2), Obis(1, 0, 0, 4, 3), Obis(1, 0, 0, 4, 5), Obis(1, 0, 0, 4, 6)
DEFAULT_HDLC_ADDRESSES = list(range(16, 32))

HINTS = {
    "connect": "nothing answers there: check the IP/port or serial device, the route, and that the modem is on",
    "handshake_refused": "the meter refused the association: wrong password or keys, or wrong client SAP",
    "handshake_timeout": "no DLMS answer: wrong baud rate or parity, wrong HDLC address, or not a DLMS meter",
}


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip("\x00 ") or None
    if isinstance(value, str):
        return value.strip() or None
    return None if value is None else str(value)


async def commission_dlms(link: TcpLink | SerialLink, registry: Registry | None, opts: Options, report: Report,
                          progress: Progress, *, auth: DlmsSettings) -> None:  # fmt: skip
    if not await _connect(link, report):
        return
    counters = InvocationCounters(opts.state_dir / "invocation_counters.sqlite")
    try:
        await _commission(link, registry, opts, report, progress, auth, counters)
    finally:
        counters.close()


async def _commission(link: TcpLink | SerialLink, registry: Registry | None, opts: Options, report: Report,
                      progress: Progress, auth: DlmsSettings, counters: InvocationCounters) -> None:  # fmt: skip
    registered = _registered(registry, link)
    if link.protocol == "dlms-wrapper":
        candidates = [None]
    else:
        # The registry's addresses on this link are always probed, first; then the range asked for.
        booked = sorted(a for a in registered if a is not None)
        wanted = booked + [a for a in (opts.addresses or DEFAULT_HDLC_ADDRESSES) if a not in booked]
        candidates = await _scan(link, wanted, registered, opts, report, progress, auth, counters)
        for address, meter in registered.items():
            if address not in candidates and address is not None:
                report.add(Check("discovery", "fail", f"no answer at HDLC address {address}", meter=meter.id,
                                 expected=f"meter {meter.id} on {link.id}",
                                 hint="dead meter, wrong address, or a break in the bus wiring"))  # fmt: skip
    for address in candidates:
        meter = registered.get(address) or _stranger(link, address, auth)
        await _meter(link, address, meter, registered.get(address), registry, opts, report, counters)


def _registered(registry: Registry | None, link: TcpLink | SerialLink) -> dict[int | None, Meter]:
    if registry is None:
        return {}
    out: dict[int | None, Meter] = {}
    for m in registry.meters():
        if m.link == link.id:
            out[(m.dlms or DlmsSettings()).physical if link.protocol == "dlms-hdlc" else None] = m
    return out


def _stranger(link: TcpLink | SerialLink, address: int | None, auth: DlmsSettings) -> Meter:
    suffix = f"@{address}" if address is not None else ""
    settings = auth.model_copy(update={"physical": address})
    return Meter(id=f"{link.id}{suffix}", link=link.id, dlms=settings)


async def _connect(link: TcpLink | SerialLink, report: Report) -> bool:
    started = time.monotonic()
    try:
        if isinstance(link, TcpLink):
            _reader, writer = await asyncio.wait_for(asyncio.open_connection(link.host, link.port),
                                                     link.timeout.total_seconds())  # fmt: skip
            writer.close()
            await writer.wait_closed()
        else:
            import serial  # pyserial: opening the port is what can fail here

            await asyncio.to_thread(lambda: serial.Serial(link.device, link.baudrate, timeout=0).close())
    except (OSError, TimeoutError) as exc:
        report.add(Check("connect", "fail", error_text(exc), expected=_where(link), hint=HINTS["connect"]))
        return False
    report.add(Check("connect", "pass", f"{_where(link)} open in {(time.monotonic() - started) * 1000:.0f} ms"))
    return True


def _where(link: TcpLink | SerialLink) -> str:
    if isinstance(link, TcpLink):
        return f"{link.host}:{link.port}"
    return f"{link.device} {link.baudrate} {link.bytesize}{link.parity}{link.stopbits}"


async def _scan(link: TcpLink | SerialLink, addresses: list[int], registered: dict[int | None, Meter],
                opts: Options, report: Report, progress: Progress, auth: DlmsSettings,
                counters: InvocationCounters) -> list[int | None]:  # fmt: skip
    """HDLC addresses that answer (an association refused still proves a meter is there)."""
    found: list[int | None] = []
    for address in time_boxed(addresses, "HDLC addresses", opts, report, progress):
        meter = registered.get(address) or _stranger(link, address, auth)
        try:
            async with DlmsSession.from_config(meter, link, timeout=opts.probe_timeout, counters=counters,
                                               system_title=dlms_system_title(opts.state_dir)):
                pass
            found.append(address)
        except (Refused, Unsupported):
            found.append(address)
        except MeterError:
            continue
    report.add(Check("discovery", "pass" if found else "fail",
                     f"{len(found)} meter(s) at HDLC address(es) {', '.join(map(str, found)) or 'none'}",
                     hint="" if found else HINTS["handshake_timeout"]))  # fmt: skip
    return found


async def _meter(link: TcpLink | SerialLink, address: int | None, meter: Meter, expected: Meter | None,
                 registry: Registry | None, opts: Options, report: Report,
                 counters: InvocationCounters) -> None:  # fmt: skip
    label = expected.id if expected else meter.id
    where = f"hdlc:{address}" if address is not None else f"wrapper:{(meter.dlms or DlmsSettings()).server_sap}"
    found = FoundMeter(where, link.protocol)
    report.meters.append(found)
    started = time.monotonic()
    try:
        title = dlms_system_title(opts.state_dir)
        session = DlmsSession.from_config(meter, link, counters=counters, system_title=title)
        async with session:
            auth = (meter.dlms or DlmsSettings()).authentication
            took = (time.monotonic() - started) * 1000
            report.add(Check("handshake", "pass", f"associated ({auth}) in {took:.0f} ms", meter=label))
            found.serial = _text(await _get(session, 1, SERIAL))
            found.model = _text(await _get(session, 1, DEVICE_NAME))
            found.firmware = _text(await _get(session, 1, FIRMWARE))
            identity(report, label, found, expected, registry)
            devices = await _get(session, 17, SAP_ASSIGNMENT)
            if isinstance(devices, list):
                names = [f"{d[0]}={_text(d[1])}" for d in devices if isinstance(d, list | tuple) and len(d) == 2]
                report.add(Check("logical_devices", "info", ", ".join(names) or "none listed", meter=label))
            ratio(report, label, await _ratio(session), expected, "no transformer ratio objects (1-0:0.4.2/0.4.3)")
            await session_checks(session, report, label, opts, meter=expected, registry=registry)
    except Refused as exc:
        report.add(Check("handshake", "fail", error_text(exc), meter=label, hint=HINTS["handshake_refused"]))
    except (Timeout, LinkDown) as exc:
        report.add(Check("handshake", "fail", error_text(exc), meter=label, hint=HINTS["handshake_timeout"]))
    except MeterError as exc:
        hint = "the meter sent something that does not parse; the raw bytes are in the log"
        report.add(Check("session", "fail", error_text(exc), meter=label, hint=hint))


async def _get(session: DlmsSession, class_id: int, obis: Obis) -> object:
    try:
        return await session.get(class_id, obis, 2)
    except Unsupported:
        return None


async def _ratio(session: DlmsSession) -> float | None:
    """CT ratio x PT ratio as programmed in the meter, None if it has no ratio objects."""
    parts = [await _get(session, 1, o) for o in (CT_NUM, CT_DEN, PT_NUM, PT_DEN)]
    if all(p is None for p in parts):
        return None

    def num(value: object) -> float:
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) and value else 1.0

    ct_num, ct_den, pt_num, pt_den = (num(p) for p in parts)
    return (ct_num / ct_den) * (pt_num / pt_den)
