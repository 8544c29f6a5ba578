"""Commissioning a Modbus line (RTU over RS-485) or gateway (TCP): scan unit ids with the
shipped register maps inside a time box, then check every meter that answers."""

from __future__ import annotations

import time
from typing import Literal

from headend.commission.checks import Options, Progress, error_text, identity, ratio, session_checks, time_boxed
from headend.commission.report import Check, FoundMeter, Report
from headend.config import Meter, SerialLink, TcpLink
from headend.protocols.base import LinkDown, MeterError, Timeout
from headend.protocols.modbus import ModbusLink
from headend.protocols.modbus_maps import MeterMap, find_map, shipped_maps
from headend.registry import Registry

Identified = tuple[str, MeterMap, str | None]  # map name, map, serial

HINTS = {
    "connect": "cannot open the line: check the gateway address/port or the serial device and its permissions",
    "silent": "nothing answers on the line: check A/B polarity, termination, baud rate and parity",
    "dead": "no answer at this unit id: meter unpowered, wrong unit id, or a break in the RS-485 wiring",
    "unknown": "a device answers here but no shipped register map fits it: add a map for its model in config/meters",
}


def _link(link: TcpLink | SerialLink, timeout: float) -> ModbusLink:
    # Every unit is probed once: no breaker may close the line on a row of silent addresses.
    return ModbusLink.from_config(link, timeout=timeout, breaker_threshold=1_000)


async def commission_modbus(link: TcpLink | SerialLink, registry: Registry | None, opts: Options, report: Report,
                            progress: Progress) -> None:  # fmt: skip
    registered = {int(m.address): m for m in (registry.meters() if registry else [])
                  if m.link == link.id and m.address is not None}  # fmt: skip
    probe = _link(link, opts.probe_timeout)
    started = time.monotonic()
    try:
        await probe.connect()
    except LinkDown as exc:
        report.add(Check("connect", "fail", error_text(exc), hint=HINTS["connect"]))
        return
    report.add(Check("connect", "pass", f"{link.id} open in {(time.monotonic() - started) * 1000:.0f} ms"))
    unidentified: set[int] = set()
    try:
        found = await _scan(probe, link, registered, opts, report, progress, unidentified)
    finally:
        probe.close()
    for unit in sorted(unidentified):
        meter = registered.get(unit)
        if meter is None:
            report.add(Check("discovery", "warn", f"unit {unit} answers, but to none of the shipped maps",
                             hint=HINTS["unknown"]))  # fmt: skip
        else:
            measured = f"unit {unit} answers, but not to the {meter.map or 'registered'} map"
            report.add(Check("discovery", "fail", measured, meter=meter.id,
                             expected=f"meter {meter.id} ({meter.map or 'no map'})",
                             hint="another model than the registry says is at this unit id"))  # fmt: skip
    for unit, meter in registered.items():
        if unit not in found and unit not in unidentified:
            report.add(Check("discovery", "fail", f"no answer at unit {unit}", meter=meter.id,
                             expected=f"meter {meter.id} ({meter.map or 'no map'})", hint=HINTS["dead"]))  # fmt: skip
    if not found:
        return
    line = _link(link, link.timeout.total_seconds())
    try:
        for unit, (map_name, meter_map, serial) in found.items():
            expected = registered.get(unit)
            label = expected.id if expected else f"{link.id}@{unit}"
            meter = FoundMeter(f"unit:{unit}", link.protocol, serial=serial, model=f"{meter_map.manufacturer} "
                               f"{meter_map.model}", map=map_name)  # fmt: skip
            report.meters.append(meter)
            identity(report, label, meter, expected, registry)
            ratio(report, label, None, expected, f"{meter_map.model} map has no transformer ratio registers")
            ct = expected.ct.factor if expected and expected.ct else 1.0
            pt = expected.pt.factor if expected and expected.pt else 1.0
            async with line.session(label, unit, meter_map, ct=ct, pt=pt) as session:
                await session_checks(session, report, label, opts, meter=expected, registry=registry)
    finally:
        line.close()


async def _scan(probe: ModbusLink, link: TcpLink | SerialLink, registered: dict[int, Meter], opts: Options,
                report: Report, progress: Progress, unidentified: set[int]) -> dict[int, Identified]:  # fmt: skip
    """Unit -> (map name, map, serial) for every unit that answers one of the maps; units that
    answer only exceptions go into `unidentified`."""
    maps = shipped_maps()
    units = opts.addresses or list(range(1, 248))
    units = sorted(set(units) | set(registered), key=lambda u: (u not in registered, u))  # registry first
    found: dict[int, Identified] = {}
    started = time.monotonic()
    for unit in time_boxed(units, "unit ids", opts, report, progress):
        meter = registered.get(unit)
        candidates = [meter.map] if meter and meter.map else []
        candidates += [name for name, m in maps.items() if m.serial is not None and name not in candidates]
        hit = await _identify(probe, unit, candidates, maps)
        if isinstance(hit, tuple):
            found[unit] = hit
        elif hit == "unidentified":
            unidentified.add(unit)
    took = time.monotonic() - started
    listing = ", ".join(f"{u} ({name})" for u, (name, _m, _s) in sorted(found.items())) or "none"
    report.add(Check("discovery", "pass" if found else "fail",
                     f"{len(found)} unit(s) answered in {took:.1f} s: {listing}",
                     hint="" if found else HINTS["silent"]))  # fmt: skip
    return found


async def _identify(probe: ModbusLink, unit: int, candidates: list[str],
                    maps: dict[str, MeterMap]) -> Identified | Literal["unidentified"] | None:  # fmt: skip
    """Read each candidate map's serial register: the first that answers is taken. A unit that
    does not answer at all is absent (None); one that answers only exceptions is there but
    unidentified."""
    answered = False
    for name in candidates:
        meter_map = maps.get(name) or find_map(name)
        spec = meter_map.serial
        if spec is None:
            continue
        exceptions_before = probe.stats.exceptions[unit]
        try:
            registers = await probe.read_registers(unit, f"unit {unit}", spec.function, spec.address, spec.width)
        except MeterError as exc:
            # An exception answer (even "busy", which maps onto Timeout) proves a device is there.
            answered = answered or probe.stats.exceptions[unit] > exceptions_before
            if isinstance(exc, Timeout) and not answered:
                return None  # nobody there: one timeout per absent unit keeps the scan short
            continue
        return name, meter_map, str(int(meter_map.decode(spec, registers)))
    return "unidentified" if answered else None
