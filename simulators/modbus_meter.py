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
import logging
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
from simulators.physics import LoadModel


class _UnhostedUnitNoise(logging.Filter):
    """pymodbus's SimCore raises KeyError(0) for a unit id it does not host (instead of the
    NoSuchIdException that `ignore_missing_devices` handles), so every such request logs a
    traceback. The answer is dropped anyway (`ModbusSimulator._trace`): keep the log clean."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Datastore unable to fulfill request: 0;" not in record.getMessage()


logging.getLogger("pymodbus.logging").addFilter(_UnhostedUnitNoise())


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
    faults: Faults = field(default_factory=Faults)
    requests: Counter[int] = field(default_factory=Counter)
    relay_writes: int = 0
    load: LoadModel = field(init=False)

    def __post_init__(self) -> None:
        if not self.serial:
            self.serial = 70_000_000 + self.unit
        self.load = LoadModel(
            t0=self.clock.now(), seed=self.unit, base_power_w=self.base_power_w, energy_start_kwh=self.energy_start_kwh
        )

    @property
    def relay_connected(self) -> bool:
        return self.load.relay_connected

    def import_kwh(self, t: float) -> float:
        return self.load.import_kwh(t)

    def value(self, obis: Obis, t: float) -> float:
        return self.load.value(obis, t)

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
        self.load.set_relay(connected, self.clock.now())

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
            self.relay_writes += 1
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
            # No meter with that unit id on this line: nobody answers (pymodbus's simulator
            # would send "device failure"; a real RS-485 line stays silent).
            return b""
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
    for unit in _units(args.disconnected) if args.disconnected else []:
        sim.meters[unit].set_relay(False)  # customers already cut off (reconnect scenarios)
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
    p.add_argument("--disconnected", help="unit ids whose relay starts open, e.g. 1-100")
    asyncio.run(_main(p.parse_args()))


if __name__ == "__main__":
    main()
