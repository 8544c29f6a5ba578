"""Modbus driver: pymodbus async clients behind MeterSession.

A `ModbusLink` is one TCP endpoint or one serial line (RS-485, RTU), shared by every meter
(unit id) on it: one request at a time, the RTU inter-frame gap kept between frames, a
timeout per request and a circuit breaker per unit, so one dead meter costs a bounded number
of timeouts and then fails fast instead of stalling the line.

Errors map onto the MeterSession hierarchy: no answer -> Timeout; an answer with a broken CRC
-> BadFrame (logged with the meter and the raw bytes, counted); exception codes 1/2 ->
Unsupported, 3 -> Refused, 4/5/6 -> Timeout (busy or failed, worth a retry), 10/11 (gateway)
-> LinkDown; no connection -> LinkDown.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ConnectionException, ModbusException, ModbusIOException
from pymodbus.framer import FramerType
from pymodbus.pdu import ExceptionResponse, ModbusPDU

from headend.breaker import CircuitBreaker
from headend.config import SerialLink, TcpLink
from headend.model import Obis, Quality, Reading, RelayAction, RelayState, transformer_ratio
from headend.protocols.base import BadFrame, LinkDown, MeterError, Refused, Timeout, Unsupported
from headend.protocols.modbus_maps import Channel, Function, MeterMap, plan_blocks

log = logging.getLogger(__name__)

_EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge (busy)",
    6: "server device busy",
    10: "gateway path unavailable",
    11: "gateway target failed to respond",
}
_KILO = {"kW": "W", "kvar": "var", "kVA": "VA"}


def crc16_modbus(data: bytes) -> int:
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def rtu_crc_ok(frame: bytes) -> bool:
    return len(frame) >= 4 and crc16_modbus(frame[:-2]) == int.from_bytes(frame[-2:], "little")


def map_exception(code: int, meter: str) -> MeterError:
    text = f"Modbus exception {code} ({_EXCEPTION_NAMES.get(code, 'unknown')})"
    if code in (1, 2):
        return Unsupported(text, meter=meter)
    if code == 3:
        return Refused(text, meter=meter)
    if code in (10, 11):
        return LinkDown(text, meter=meter)
    return Timeout(text, meter=meter)


@dataclass
class LinkStats:
    requests: Counter[int] = field(default_factory=Counter)
    timeouts: Counter[int] = field(default_factory=Counter)
    bad_frames: Counter[int] = field(default_factory=Counter)
    exceptions: Counter[int] = field(default_factory=Counter)
    fast_fails: Counter[int] = field(default_factory=Counter)


class ModbusLink:
    def __init__(
        self,
        client: AsyncModbusTcpClient | AsyncModbusSerialClient,
        *,
        name: str,
        timeout: float,
        frame_gap: float = 0.0,
        breaker_threshold: int = 3,
        breaker_cooldown: float = 60.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.name = name
        self.timeout = timeout
        self.frame_gap = frame_gap
        self.breaker_threshold = breaker_threshold
        self.breaker_cooldown = breaker_cooldown
        self.monotonic = monotonic
        self.stats = LinkStats()
        self._lock = asyncio.Lock()
        self._quiet_from = 0.0
        self._breakers: dict[int, CircuitBreaker] = {}
        self._rx = bytearray()
        self._rtu = isinstance(client, AsyncModbusSerialClient)

    @classmethod
    def tcp(cls, host: str, port: int, *, timeout: float = 3.0, name: str | None = None, **kwargs: Any) -> ModbusLink:
        link: ModbusLink
        client = AsyncModbusTcpClient(
            host, port=port, timeout=timeout, retries=0, reconnect_delay=0.5, reconnect_delay_max=10,
            trace_packet=lambda sending, data: link._trace(sending, data),
        )  # fmt: skip
        link = cls(client, name=name or f"tcp:{host}:{port}", timeout=timeout, **kwargs)
        return link

    @classmethod
    def serial(
        cls,
        port: str,
        *,
        baudrate: int = 9600,
        parity: str = "N",
        bytesize: int = 8,
        stopbits: int = 1,
        timeout: float = 1.0,
        name: str | None = None,
        **kwargs: Any,
    ) -> ModbusLink:
        link: ModbusLink
        client = AsyncModbusSerialClient(
            port, framer=FramerType.RTU, baudrate=baudrate, parity=parity, bytesize=bytesize, stopbits=stopbits,
            timeout=timeout, retries=0, reconnect_delay=0.5, reconnect_delay_max=10,
            trace_packet=lambda sending, data: link._trace(sending, data),
        )  # fmt: skip
        # Modbus over serial line v1.02: 3.5 character times between frames, 1.75 ms above 19200 baud.
        char_time = (1 + bytesize + (0 if parity == "N" else 1) + stopbits) / baudrate
        gap = 0.00175 if baudrate > 19200 else 3.5 * char_time
        link = cls(client, name=name or f"rtu:{port}", timeout=timeout, frame_gap=gap, **kwargs)
        return link

    @classmethod
    def from_config(cls, link: TcpLink | SerialLink, *, timeout: float | None = None, **kwargs: Any) -> ModbusLink:
        """A link for a config entry; `timeout` (default: the link's) and breaker settings can
        be overridden (a scan probes with a short timeout and no breaker)."""
        seconds = link.timeout.total_seconds() if timeout is None else timeout
        if isinstance(link, TcpLink):
            return cls.tcp(link.host, link.port, timeout=seconds, name=link.id, **kwargs)
        return cls.serial(
            link.device,
            baudrate=link.baudrate,
            parity=link.parity,
            bytesize=link.bytesize,
            stopbits=link.stopbits,
            timeout=seconds,
            name=link.id,
            **kwargs,
        )

    def _trace(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            self._rx += data
        return data

    async def connect(self) -> None:
        if self.client.connected:
            return
        try:
            ok = await asyncio.wait_for(self.client.connect(), self.timeout * 2)
        except (TimeoutError, OSError, ModbusException) as exc:
            raise LinkDown(f"{self.name}: cannot connect: {exc}") from exc
        if not ok:
            raise LinkDown(f"{self.name}: cannot connect")

    def close(self) -> None:
        self.client.close()

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def breaker(self, unit: int) -> CircuitBreaker:
        if unit not in self._breakers:
            self._breakers[unit] = CircuitBreaker(self.breaker_threshold, self.breaker_cooldown, self.monotonic)
        return self._breakers[unit]

    async def call(self, unit: int, meter: str, request: Callable[[], Any]) -> ModbusPDU:
        """Run one request on the line, alone, with the gap, timeout and breaker."""
        breaker = self.breaker(unit)
        if breaker.is_open:
            self.stats.fast_fails[unit] += 1
            wait = breaker.open_until - self.monotonic()
            raise Timeout(f"circuit open after {breaker.failures} timeouts; next try in {wait:.0f}s", meter=meter)
        async with self._lock:
            await self.connect()
            wait = self._quiet_from - asyncio.get_running_loop().time()
            if wait > 0:
                await asyncio.sleep(wait)  # the line's inter-frame silence, not a wait for an event
            self._rx.clear()
            self.stats.requests[unit] += 1
            try:
                async with asyncio.timeout(self.timeout * 2 + 1):
                    response = await request()
            except ConnectionException as exc:
                raise LinkDown(f"{self.name}: {exc}", meter=meter) from exc
            except (ModbusIOException, TimeoutError) as exc:
                breaker.record(False)
                raise self._no_answer(unit, meter) from exc
            finally:
                self._quiet_from = asyncio.get_running_loop().time() + self.frame_gap
        breaker.record(True)
        if isinstance(response, ExceptionResponse) or response.isError():
            code = getattr(response, "exception_code", 0)
            self.stats.exceptions[unit] += 1
            raise map_exception(code, meter)
        return response

    def _no_answer(self, unit: int, meter: str) -> MeterError:
        raw = bytes(self._rx)
        if raw and self._rtu and not rtu_crc_ok(raw):
            self.stats.bad_frames[unit] += 1
            log.warning("%s: bad frame from unit %d (%s) on %s: %s", meter, unit, "CRC error", self.name, raw.hex())
            return BadFrame(f"CRC error in the answer of unit {unit} on {self.name}", meter=meter, raw=raw)
        self.stats.timeouts[unit] += 1
        return Timeout(f"no answer from unit {unit} on {self.name} within {self.timeout}s", meter=meter)

    async def read_registers(self, unit: int, meter: str, function: Function, address: int, count: int) -> list[int]:
        if function == "holding":
            response = await self.call(
                unit, meter, lambda: self.client.read_holding_registers(address, count=count, device_id=unit)
            )
        else:
            response = await self.call(
                unit, meter, lambda: self.client.read_input_registers(address, count=count, device_id=unit)
            )
        registers = list(response.registers)
        if len(registers) < count:
            raise BadFrame(f"asked {count} registers at {address}, got {len(registers)}", meter=meter)
        return registers[:count]

    async def read_coil(self, unit: int, meter: str, address: int) -> bool:
        response = await self.call(unit, meter, lambda: self.client.read_coils(address, count=1, device_id=unit))
        return bool(response.bits[0])

    async def write_coil(self, unit: int, meter: str, address: int, value: bool) -> None:
        await self.call(unit, meter, lambda: self.client.write_coil(address, value, device_id=unit))

    async def write_register(self, unit: int, meter: str, address: int, value: int) -> None:
        await self.call(unit, meter, lambda: self.client.write_register(address, value, device_id=unit))

    def session(
        self,
        meter: str,
        unit: int,
        meter_map: MeterMap,
        *,
        ct: float = 1.0,
        pt: float = 1.0,
        now: Callable[[], datetime] | None = None,
    ) -> ModbusMeterSession:
        return ModbusMeterSession(self, meter, unit, meter_map, ct=ct, pt=pt, now=now)


class ModbusMeterSession:
    """MeterSession for one unit on a ModbusLink."""

    profile_on_meter_clock = True

    def __init__(
        self,
        link: ModbusLink,
        meter: str,
        unit: int,
        meter_map: MeterMap,
        *,
        ct: float = 1.0,
        pt: float = 1.0,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        if not 1 <= unit <= 247:
            raise ValueError(f"{meter}: Modbus unit id must be 1..247, got {unit}")
        self.link = link
        self.meter = meter
        self.unit = unit
        self.map = meter_map
        self.ct = ct
        self.pt = pt
        self.now = now or (lambda: datetime.now(UTC))
        self.source = f"modbus/{link.name}/{unit}"

    async def __aenter__(self) -> Self:
        await self.link.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def _reading(self, channel: Channel, raw: float, t: datetime) -> Reading:
        unit, scaler = channel.unit, channel.scaler
        if unit in _KILO:
            unit, scaler = _KILO[unit], scaler + 3
        if not math.isfinite(raw):
            # Meters answer NaN for a quantity they do not measure right now.
            return Reading(
                meter=self.meter, channel=channel.obis, timestamp=t, value=None, unit=unit, kind="register",
                qualities=(Quality.MISSING,), source=self.source, scaler=scaler,
            )  # fmt: skip
        ratio = transformer_ratio(channel.obis, self.ct, self.pt)
        return Reading.from_raw(
            self.meter, channel.obis, t, raw, scaler=scaler, multiplier=ratio, unit=unit, kind="register",
            source=self.source,
        )  # fmt: skip

    async def read_registers(self, channels: Sequence[Obis]) -> list[Reading]:
        wanted = []
        for obis in channels:
            try:
                wanted.append(self.map.channel(obis))
            except KeyError:
                raise Unsupported(
                    f"{self.map.manufacturer} {self.map.model} map has no {obis}", meter=self.meter
                ) from None
        readings = []
        for block in plan_blocks(self.map, wanted):
            registers = await self.link.read_registers(
                self.unit, self.meter, block.function, block.address, block.count
            )
            t = self.now()
            for channel in block.channels:
                readings.append(self._reading(channel, self.map.decode(channel, block.slice(registers, channel)), t))
        order = {obis: i for i, obis in enumerate(channels)}
        return sorted(readings, key=lambda r: order[r.channel])

    async def read_serial(self) -> int:
        spec = self.map.serial
        if spec is None:
            raise Unsupported(f"{self.map.model} map has no serial number register", meter=self.meter)
        registers = await self.link.read_registers(self.unit, self.meter, spec.function, spec.address, spec.width)
        return int(self.map.decode(spec, registers))

    async def read_profile(self, profile: Obis, since: datetime, until: datetime | None = None) -> list[Reading]:
        raise Unsupported(
            "Modbus meters keep no load profile; intervals are built from energy registers read at interval "
            "boundaries (headend.protocols.modbus_intervals)",
            meter=self.meter,
        )

    async def read_billing(self, since: datetime, until: datetime | None = None) -> list[Reading]:
        raise Unsupported(f"{self.map.manufacturer} {self.map.model} map has no frozen billing registers",
                          meter=self.meter)  # fmt: skip

    async def read_events(self, since: datetime, until: datetime | None = None) -> list[Reading]:
        raise Unsupported(f"{self.map.model} has no event log over Modbus", meter=self.meter)

    async def read_clock(self) -> datetime:
        raise Unsupported(f"{self.map.model} has no clock over Modbus", meter=self.meter)

    async def set_clock(self, t: datetime) -> None:
        raise Unsupported(f"{self.map.model} has no clock over Modbus", meter=self.meter)

    def _relay(self) -> Any:
        if self.map.relay is None:
            raise Unsupported(f"{self.map.manufacturer} {self.map.model} map has no relay", meter=self.meter)
        return self.map.relay

    async def read_relay(self) -> RelayState:
        relay = self._relay()
        if relay.kind == "coil":
            closed = await self.link.read_coil(self.unit, self.meter, relay.address)
            return RelayState.CONNECTED if closed else RelayState.DISCONNECTED
        (value,) = await self.link.read_registers(self.unit, self.meter, "holding", relay.address, 1)
        if value == relay.connected:
            return RelayState.CONNECTED
        if value == relay.disconnected:
            return RelayState.DISCONNECTED
        raise BadFrame(
            f"relay register {relay.address} reads {value}, neither connected ({relay.connected}) "
            f"nor disconnected ({relay.disconnected})",
            meter=self.meter,
        )

    async def operate_relay(self, action: RelayAction) -> None:
        """Send the switching command. Confirmation is the caller's read_relay(), never assumed."""
        relay = self._relay()
        connect = action == RelayAction.RECONNECT
        if relay.kind == "coil":
            await self.link.write_coil(self.unit, self.meter, relay.address, connect)
        else:
            value = relay.connected if connect else relay.disconnected
            await self.link.write_register(self.unit, self.meter, relay.address, value)
