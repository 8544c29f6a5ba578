"""Modbus meter simulator: pymodbus servers presenting any shipped register map.

Values evolve with (simulated) time: energy is the integral of a day-shaped power curve, so
it only ever grows; voltage, current and frequency stay plausible; a relay coil (for maps
with a `[relay]`) cuts the load when open. Many unit ids share one server, over TCP or over
RTU on a serial port (a real pty in tests).

Faults, per unit: `no_response` (the answer is dropped), `exception` (an exception code),
`crc_error` (RTU answer with a broken CRC), `delay` (seconds before answering),
`stuck_relay` (coil writes are acknowledged but the relay does not move).

    python -m simulators.modbus_meter --map eastron-sdm630 --units 1,2,3 --tcp 127.0.0.1:5020
    python -m simulators.modbus_meter --map abb-b23 --units 1-3 --serial /dev/pts/7
"""

from __future__ import annotations

import argparse
import asyncio
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import SimData, SimDevice
from pymodbus.simulator.simutils import DataType

from headend.model import Obis
from headend.protocols.modbus_maps import Channel, MeterMap, RegisterSpec, decode, encode, find_map
from simulators.clock import Clock

DAY = 86_400.0
ENERGY_IMPORT = Obis(1, 0, 1, 8, 0)
ENERGY_EXPORT = Obis(1, 0, 2, 8, 0)

# Engineering value of each OBIS measurand, in the unit the map declares, from the physics.
_PHASE_VOLTAGE = {Obis(1, 0, 32, 7, 0): 0, Obis(1, 0, 52, 7, 0): 1, Obis(1, 0, 72, 7, 0): 2}
_PHASE_CURRENT = {Obis(1, 0, 31, 7, 0): 0, Obis(1, 0, 51, 7, 0): 1, Obis(1, 0, 71, 7, 0): 2}
_PHASE_POWER = {Obis(1, 0, 36, 7, 0): 0, Obis(1, 0, 56, 7, 0): 1, Obis(1, 0, 76, 7, 0): 2}
_TOTAL_POWER = Obis(1, 0, 16, 7, 0)
_FREQUENCY = Obis(1, 0, 14, 7, 0)


@dataclass
class Faults:
    no_response: bool = False
    exception: int | None = None
    crc_error: bool = False
    delay: float = 0.0
    stuck_relay: bool = False


@dataclass
class SimulatedMeter:
    """One meter (unit id) and its physics."""

    unit: int
    meter_map: MeterMap
    clock: Clock
    serial: int = 0
    base_power_w: float = 3000.0
    energy_start_kwh: float = 12_345.0
    relay_connected: bool = True
    faults: Faults = field(default_factory=Faults)
    requests: Counter[int] = field(default_factory=Counter)
    _lost_kwh: float = 0.0
    _open_since: float | None = None

    def __post_init__(self) -> None:
        if not self.serial:
            self.serial = 70_000_000 + self.unit
        self._phase = (self.unit * 0.37) % 1.0
        self._t0 = self.clock.now()

    # -- physics ---------------------------------------------------------------------

    def _closed_form_kwh(self, t: float) -> float:
        """Energy of P(t) = P0 (1 + 0.5 sin(w t + phi)) from the meter's start to t, in kWh."""
        w = 2 * math.pi / DAY
        phi = self._phase * 2 * math.pi
        p0 = self.base_power_w
        joules = p0 * (t - self._t0) + 0.5 * p0 / w * (math.cos(w * self._t0 + phi) - math.cos(w * t + phi))
        return joules / 3.6e6

    def import_kwh(self, t: float) -> float:
        lost = self._lost_kwh
        if self._open_since is not None:
            lost += self._closed_form_kwh(t) - self._closed_form_kwh(self._open_since)
        return self.energy_start_kwh + self._closed_form_kwh(t) - lost

    def power_w(self, t: float) -> float:
        if not self.relay_connected:
            return 0.0
        return self.base_power_w * (1 + 0.5 * math.sin(2 * math.pi * t / DAY + self._phase * 2 * math.pi))

    def voltage_v(self, t: float, phase: int) -> float:
        return 230.0 + 3.0 * math.sin(2 * math.pi * t / 3600 + phase)

    def value(self, obis: Obis, t: float) -> float:
        """The true value of a measurand, in SI base units (W, V, A, Hz, kWh)."""
        if obis == ENERGY_IMPORT:
            return self.import_kwh(t)
        if obis == ENERGY_EXPORT:
            return 10.0 + self.unit  # a consumer: export stays put
        if obis in _PHASE_VOLTAGE:
            return self.voltage_v(t, _PHASE_VOLTAGE[obis])
        if obis in _PHASE_POWER:
            return self.power_w(t) / 3
        if obis in _PHASE_CURRENT:
            i = _PHASE_CURRENT[obis]
            return self.power_w(t) / 3 / self.voltage_v(t, i)
        if obis == _TOTAL_POWER:
            return self.power_w(t)
        if obis == _FREQUENCY:
            return 50.0 + 0.02 * math.sin(2 * math.pi * t / 600)
        raise KeyError(f"the simulator has no physics for {obis}")

    # -- what goes on the wire -------------------------------------------------------

    def registers(self, spec: RegisterSpec, value: float) -> list[int]:
        word, byte = self.meter_map.order(spec)
        return encode(value, spec.type, word, byte)

    def raw_for(self, channel: Channel, t: float) -> float:
        value = self.value(channel.obis, t)
        if channel.unit.startswith("k") and channel.unit != "kWh":
            value /= 1000.0  # kW, kvar: the physics works in W
        scaled = value / channel.scale
        return scaled if channel.type.startswith("float") else round(scaled)

    def expected(self, obis: Obis, t: float) -> float:
        """What a correct client decodes for this channel at time t (after the wire's rounding)."""
        channel = self.meter_map.channel(obis)
        word, byte = self.meter_map.order(channel)
        raw = decode(self.registers(channel, self.raw_for(channel, t)), channel.type, word, byte)
        return raw * channel.scale

    def refresh(self, registers: list[int], start: int, function: str) -> None:
        t = self.clock.now()
        for channel in self.meter_map.channels:
            if channel.function == function:
                offset = channel.address - start
                registers[offset : offset + channel.width] = self.registers(channel, self.raw_for(channel, t))
        serial = self.meter_map.serial
        if serial is not None and serial.function == function:
            offset = serial.address - start
            registers[offset : offset + serial.width] = self.registers(serial, self.serial)

    def set_relay(self, connected: bool) -> None:
        if connected == self.relay_connected:
            return
        t = self.clock.now()
        if connected and self._open_since is not None:
            self._lost_kwh += self._closed_form_kwh(t) - self._closed_form_kwh(self._open_since)
            self._open_since = None
        elif not connected:
            self._open_since = t
        self.relay_connected = connected

    async def action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        self.requests[function_code] += 1
        if self.faults.delay:
            await asyncio.sleep(self.faults.delay)
        if self.faults.exception is not None:
            return ExcCodes(self.faults.exception)
        if function_code in (3, 4):
            self.refresh(registers, start_address, "holding" if function_code == 3 else "input")
        relay = self.meter_map.relay
        coil = relay is not None and relay.kind == "coil" and function_code in (1, 5, 15)
        register = relay is not None and relay.kind == "register" and function_code in (3, 6, 16)
        if relay is None or not (coil or register):
            return None
        if set_values:
            if register and address != relay.address:
                return None
            wanted = bool(set_values[0]) if coil else int(set_values[0]) == relay.connected
            if not self.faults.stuck_relay:
                self.set_relay(wanted)
            # What is stored is what the relay really did; a stuck relay keeps its state.
            set_values[0] = self._relay_word(coil)  # type: ignore[call-overload]
        else:
            registers[relay.address - start_address] = self._relay_word(coil)
        return None

    def _relay_word(self, coil: bool) -> int:
        relay = self.meter_map.relay
        assert relay is not None
        if coil:
            return int(self.relay_connected)
        return relay.connected if self.relay_connected else relay.disconnected

    def device(self) -> SimDevice:
        return SimDevice(
            id=self.unit,
            simdata=(
                self._coils(),
                [SimData(address=0, count=1, values=[False], datatype=DataType.BITS)],
                self._block("holding"),
                self._block("input"),
            ),
            action=self.action,
        )

    def _coils(self) -> list[SimData]:
        relay = self.meter_map.relay
        # One register per coil (pymodbus's separate-blocks mode); only a coil relay at 0 is modelled.
        if relay is not None and relay.kind == "coil" and relay.address != 0:
            raise ValueError("the simulator models a relay coil at address 0 only")
        return [SimData(address=0, count=1, values=[self.relay_connected], datatype=DataType.BITS)]

    def _block(self, function: str) -> list[SimData]:
        specs: list[RegisterSpec] = [c for c in self.meter_map.channels if c.function == function]
        serial = self.meter_map.serial
        if serial is not None and serial.function == function:
            specs.append(serial)
        relay = self.meter_map.relay
        lo = min((s.address for s in specs), default=0)
        hi = max((s.last for s in specs), default=0)
        if relay is not None and relay.kind == "register" and function == "holding":
            lo, hi = min(lo, relay.address), max(hi, relay.address)
        # Registers between mapped ones read as 0, as on meters that tolerate gap reads.
        return [SimData(address=lo, count=hi - lo + 1, values=0, datatype=DataType.REGISTERS)]


def _unit_of(frame: bytes, rtu: bool) -> int | None:
    if rtu:
        return frame[0] if frame else None
    return frame[6] if len(frame) > 6 else None


class ModbusSimulator:
    """One server (TCP listener or serial line) hosting many simulated meters."""

    def __init__(self, meters: list[SimulatedMeter]) -> None:
        self.meters = {m.unit: m for m in meters}
        self._server: ModbusTcpServer | ModbusSerialServer | None = None
        self._rtu = False

    def _trace(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            return data
        meter = self.meters.get(_unit_of(data, self._rtu) or -1)
        if meter is None:
            return data
        if meter.faults.no_response:
            return b""
        if meter.faults.crc_error and self._rtu and len(data) > 2:
            return data[:-1] + bytes([data[-1] ^ 0xFF])
        return data

    async def start_tcp(self, host: str, port: int) -> None:
        self._server = ModbusTcpServer(
            [m.device() for m in self.meters.values()],
            address=(host, port),
            ignore_missing_devices=True,
            trace_packet=self._trace,
        )
        await self._server.serve_forever(background=True)

    async def start_rtu(self, port: str, baudrate: int = 9600) -> None:
        self._rtu = True
        self._server = ModbusSerialServer(
            [m.device() for m in self.meters.values()],
            framer=FramerType.RTU,
            port=port,
            baudrate=baudrate,
            ignore_missing_devices=True,
            trace_packet=self._trace,
        )
        await self._server.serve_forever(background=True)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.shutdown()
            self._server = None

    async def __aenter__(self) -> ModbusSimulator:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()


def _units(text: str) -> list[int]:
    units: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        units.extend(range(int(lo), int(hi or lo) + 1))
    return units


async def _main(args: argparse.Namespace) -> None:
    meter_map = find_map(args.map)
    clock = Clock()
    sim = ModbusSimulator([SimulatedMeter(u, meter_map, clock) for u in _units(args.units)])
    if args.tcp:
        host, _, port = args.tcp.rpartition(":")
        await sim.start_tcp(host or "127.0.0.1", int(port))
        print(f"{meter_map.manufacturer} {meter_map.model} units {args.units} on tcp {args.tcp}", flush=True)
    else:
        await sim.start_rtu(args.serial, args.baudrate)
        print(f"{meter_map.manufacturer} {meter_map.model} units {args.units} on {args.serial}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--map", default="eastron-sdm630", help="shipped map name or path to a map file")
    p.add_argument("--units", default="1", help="unit ids, e.g. 1,2,5-7")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--tcp", help="HOST:PORT to listen on")
    where.add_argument("--serial", help="serial port (RTU)")
    p.add_argument("--baudrate", type=int, default=9600)
    asyncio.run(_main(p.parse_args()))


if __name__ == "__main__":
    main()
