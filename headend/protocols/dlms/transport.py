"""Byte transports under the DLMS client: the TCP wrapper, and HDLC over TCP or a serial port.

Each carries whole APDUs (`exchange(apdu) -> apdu`) and maps what goes wrong onto the
MeterSession errors: no connection -> LinkDown, silence -> Timeout, bytes that are not a
frame -> BadFrame (with the raw bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

import serial_asyncio_fast

from headend.protocols.base import BadFrame, LinkDown, MeterError, Timeout
from headend.protocols.dlms import hdlc
from headend.protocols.dlms.hdlc_link import Connected, Disconnected, Event, HdlcConnection, Received, Refused
from headend.protocols.dlms.wrapper import WrapperError, WrapperFrame, read_frame

log = logging.getLogger(__name__)

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
T = TypeVar("T")


class StreamTransport:
    """Common plumbing: open a stream, run one request/answer under the timeout, close."""

    def __init__(self, opener: Callable[[], Awaitable[Streams]], where: str, meter: str, timeout: float) -> None:
        self._opener = opener
        self.where = where
        self.meter = meter
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    def bad(self, what: str, raw: bytes) -> BadFrame:
        log.warning("%s: bad frame from %s (%s): %s", self.meter, self.where, what, raw[:256].hex())
        return BadFrame(what, meter=self.meter, raw=raw)

    async def open(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                self._reader, self._writer = await self._opener()
        except (OSError, TimeoutError) as exc:
            raise LinkDown(f"cannot open {self.where}: {exc}", meter=self.meter) from None

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(self.timeout):
                    await writer.wait_closed()

    @property
    def is_open(self) -> bool:
        return self._writer is not None

    def _silence(self) -> str:
        """What came instead of an answer, for the Timeout's message (empty: nothing)."""
        return ""

    async def _guarded(self, work: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[T]]) -> T:
        if self._writer is None or self._reader is None:
            raise LinkDown(f"{self.where} is not open", meter=self.meter)
        try:
            async with asyncio.timeout(self.timeout):
                return await work(self._reader, self._writer)
        except TimeoutError:
            await self.close()
            raise Timeout(f"no complete answer within {self.timeout}s{self._silence()}", meter=self.meter) from None
        except asyncio.IncompleteReadError as exc:
            await self.close()
            if exc.partial:
                raise self.bad("connection closed in the middle of a frame", exc.partial) from None
            raise LinkDown(f"{self.where} closed the connection", meter=self.meter) from None
        except (WrapperError, hdlc.HdlcError) as exc:
            await self.close()
            raise self.bad(str(exc), exc.raw) from None
        except MeterError:
            await self.close()
            raise
        except OSError as exc:
            await self.close()
            raise LinkDown(f"{self.where}: {exc}", meter=self.meter) from None


class WrapperTransport(StreamTransport):
    def __init__(self, host: str, port: int, meter: str, *, client_sap: int, server_sap: int = 1,
                 timeout: float = 10.0) -> None:  # fmt: skip
        super().__init__(lambda: asyncio.open_connection(host, port), f"{host}:{port}", meter, timeout)
        self.client_sap = client_sap
        self.server_sap = server_sap

    async def exchange(self, apdu: bytes) -> bytes:
        async def work(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
            writer.write(WrapperFrame(self.client_sap, self.server_sap, apdu).to_bytes())
            await writer.drain()
            return (await read_frame(reader)).apdu

        return await self._guarded(work)

    async def release_link(self) -> None:
        return None


class HdlcTransport(StreamTransport):
    """HDLC: the link's state is a sans-IO HdlcConnection (hdlc_link.py); this moves its bytes."""

    def __init__(self, opener: Callable[[], Awaitable[Streams]], where: str, meter: str, *, client_sap: int,
                 server_logical: int = 1, server_physical: int | None = None, timeout: float = 10.0,
                 max_info: int = hdlc.DEFAULT_MAX_INFO) -> None:  # fmt: skip
        super().__init__(opener, where, meter, timeout)
        self.client = hdlc.encode_address(client_sap)
        self.server = hdlc.encode_address(server_logical, server_physical)
        self.max_info = max_info
        self._link = HdlcConnection(self.client, self.server, server=False, max_info=max_info)
        self._events: deque[Event] = deque()

    @classmethod
    def tcp(cls, host: str, port: int, meter: str, **kwargs: object) -> HdlcTransport:
        return cls(lambda: asyncio.open_connection(host, port), f"hdlc+tcp {host}:{port}", meter, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def serial(cls, device: str, meter: str, *, baudrate: int = 9600, **kwargs: object) -> HdlcTransport:
        def opener() -> Awaitable[Streams]:
            return serial_asyncio_fast.open_serial_connection(url=device, baudrate=baudrate)

        return cls(opener, f"hdlc {device}@{baudrate}", meter, **kwargs)  # type: ignore[arg-type]

    def _silence(self) -> str:
        noise = self._link.frames
        if not noise.noise_bytes:
            return ""
        # A meter at another speed or parity sends bytes that never make a frame.
        log.warning("%s: %d bytes of line noise on %s, the last: %s", self.meter, noise.noise_bytes, self.where,
                    noise.noise.hex())  # fmt: skip
        return f"; {noise.noise_bytes} bytes of line noise instead (wrong speed or parity?): {noise.noise.hex()}"

    async def _next_event(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Event:
        """Send what the link has to send (a frame, an RR), read until it has an event."""
        while True:
            out = self._link.data_to_send()
            if out:
                writer.write(out)
                await writer.drain()
            if self._events:
                return self._events.popleft()
            data = await reader.read(4096)
            if not data:
                raise asyncio.IncompleteReadError(self._link.buffered, None)
            self._events.extend(self._link.receive_data(data))

    async def open(self) -> None:
        await super().open()

        async def connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._link.connect()
            event = await self._next_event(reader, writer)
            if isinstance(event, Refused):
                raise LinkDown("meter answered SNRM with DM (disconnected mode)", meter=self.meter)
            if not isinstance(event, Connected):
                raise hdlc.HdlcError(f"expected UA to SNRM, got {event}")

        self._link = HdlcConnection(self.client, self.server, server=False, max_info=self.max_info)
        self._events.clear()
        await self._guarded(connect)

    async def exchange(self, apdu: bytes) -> bytes:
        async def work(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
            if self._events:  # something came that nothing asked for: whatever follows is in doubt
                raise hdlc.HdlcError(f"an answer nobody asked for: {self._events[0]}")
            self._link.send(apdu)
            event = await self._next_event(reader, writer)
            if isinstance(event, Disconnected):
                raise LinkDown("the meter dropped the HDLC link (DM) in the middle of an exchange", meter=self.meter)
            if not isinstance(event, Received):
                raise hdlc.HdlcError(f"expected an answer, got {event}")
            return event.apdu

        return await self._guarded(work)

    async def release_link(self) -> None:
        async def disconnect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._link.disconnect()
            await self._next_event(reader, writer)

        if self.is_open:
            with contextlib.suppress(MeterError):
                await self._guarded(disconnect)
