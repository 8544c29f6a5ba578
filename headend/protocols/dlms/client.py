"""DLMS/COSEM client session over the TCP wrapper or HDLC (serial or TCP): a MeterSession.

Every read from the socket is under the session timeout, every frame and APDU is parsed by
bounded parsers, and any parse failure ends the session with BadFrame (logged once with
the meter and the raw bytes). Keys and passwords are never logged.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self

from headend.config import DlmsSettings, Meter, SerialLink, TcpLink
from headend.model import (
    EVENT_LOG,
    Obis,
    Quality,
    Reading,
    RelayAction,
    RelayState,
    event_readings,
    transformer_ratio,
    validate_quality_code,
)
from headend.protocols.base import BadFrame, MeterError, Refused, Timeout, Unsupported
from headend.protocols.dlms import axdr, codec, xdlms
from headend.protocols.dlms.axdr import DateTime, Structure, Typed
from headend.protocols.dlms.security import InvocationCounters, Protection, ProtectionError, hls_check, hls_reply
from headend.protocols.dlms.transport import HdlcTransport, WrapperTransport

log = logging.getLogger(__name__)

CLOCK = Obis(0, 0, 1, 0, 0)
#: The billing profiles: registers frozen at each day's and month's end (IEC 62056-6-1 / IDIS).
BILLING_PROFILES = ((Obis(0, 0, 98, 1, 0), "daily"), (Obis(0, 0, 98, 2, 0), "monthly"))
CURRENT_ASSOCIATION = Obis(0, 0, 40, 0, 0)
DISCONNECT_CONTROL = Obis(0, 0, 96, 3, 10)
EVENT_CODE = Obis(0, 0, 96, 11, 0)
PUBLIC_CLIENT = 16
MANAGEMENT_CLIENT = 1
# DLMS unit codes (Blue Book) -> (unit, extra decimal exponent): energy is reported in kWh
# and kvarh across all protocols.
_UNITS: dict[int, tuple[str, int]] = {
    27: ("W", 0), 28: ("VA", 0), 29: ("var", 0), 30: ("kWh", -3), 31: ("kVAh", -3), 32: ("kvarh", -3),
    33: ("A", 0), 35: ("V", 0), 44: ("Hz", 0), 255: ("", 0),
}  # fmt: skip
Column = tuple[int, Obis, int]  # a capture object: class id, logical name, attribute
Row = tuple[datetime, list[Any]]
_CONTROL_STATES = {0: RelayState.DISCONNECTED, 1: RelayState.CONNECTED, 2: RelayState.READY_FOR_RECONNECTION}


#: Per meter, GET answers on lenient links whose bytes after the value were passed over
#: (/metrics: headend_dlms_trailing_bytes_ignored_total).
trailing_bytes_ignored: collections.Counter[str] = collections.Counter()


class DlmsSession:
    profile_on_meter_clock = True

    def __init__(
        self,
        transport: WrapperTransport | HdlcTransport,
        *,
        authentication: str = codec.AUTH_NONE,
        password: bytes | None = None,
        keys: codec.Keys | None = None,
        system_title: bytes = b"HEADEND0",
        counters: InvocationCounters | None = None,
        ct: float = 1.0,
        pt: float = 1.0,
        now: Callable[[], datetime] | None = None,
        session_deadline: float = 600.0,
        max_get_bytes: int = 16 * 1024 * 1024,
        max_get_blocks: int = 20_000,
        lenient: bool = False,
    ) -> None:
        """`session_deadline`: seconds a whole session (association to release) may take;
        `max_get_bytes`/`max_get_blocks`: what one GET may bring in blocks. A meter that keeps
        talking past any of them gets its session closed with a clear error, and memory stays
        bounded whatever it sends. `lenient`: bytes after the array or structure of a GET
        answer sent in blocks are logged, counted (`trailing_bytes_ignored`) and passed over
        instead of failing the read (the Gurux C example server sends 11 after a profile's
        last block; Gurux's client ignores them), unless they begin like one more element;
        strict by default, as the standard says."""
        if authentication == codec.AUTH_HLS_GMAC and (keys is None or counters is None):
            raise ValueError("HLS-GMAC needs the global keys and a durable invocation counter store")
        if len(system_title) != 8:
            raise ValueError(f"a system title is 8 bytes, got {len(system_title)}")
        self.keys = keys
        self.system_title = system_title
        self.counters = counters
        self.protection: Protection | None = None
        self.transport = transport
        self.meter = transport.meter
        self.authentication = authentication
        self._password = password
        self.ct = ct
        self.pt = pt
        self.now = now or (lambda: datetime.now(UTC))
        self.source = f"dlms/{transport.where}"
        self._invoke = 0
        self._scalers: dict[Obis, tuple[int, int]] = {}
        self.lenient = lenient
        self.session_deadline = session_deadline
        self.max_get_bytes = max_get_bytes
        self.max_get_blocks = max_get_blocks
        self._deadline = float("inf")

    @classmethod
    def tcp_wrapper(cls, host: str, port: int, meter: str, *, authentication: str = codec.AUTH_NONE,
                    client_sap: int | None = None, server_sap: int = 1, timeout: float = 10.0,
                    **kwargs: Any) -> DlmsSession:  # fmt: skip
        transport = WrapperTransport(
            host, port, meter, client_sap=_client_sap(authentication, client_sap), server_sap=server_sap,
            timeout=timeout,
        )  # fmt: skip
        return cls(transport, authentication=authentication, **kwargs)

    @classmethod
    def hdlc_tcp(cls, host: str, port: int, meter: str, *, authentication: str = codec.AUTH_NONE,
                 client_sap: int | None = None, server_logical: int = 1, server_physical: int | None = None,
                 timeout: float = 10.0, **kwargs: Any) -> DlmsSession:  # fmt: skip
        transport = HdlcTransport.tcp(
            host, port, meter, client_sap=_client_sap(authentication, client_sap), server_logical=server_logical,
            server_physical=server_physical, timeout=timeout,
        )  # fmt: skip
        return cls(transport, authentication=authentication, **kwargs)

    @classmethod
    def hdlc_serial(cls, device: str, meter: str, *, baudrate: int = 9600, authentication: str = codec.AUTH_NONE,
                    client_sap: int | None = None, server_logical: int = 1, server_physical: int | None = None,
                    timeout: float = 10.0, **kwargs: Any) -> DlmsSession:  # fmt: skip
        transport = HdlcTransport.serial(
            device, meter, baudrate=baudrate, client_sap=_client_sap(authentication, client_sap),
            server_logical=server_logical, server_physical=server_physical, timeout=timeout,
        )  # fmt: skip
        return cls(transport, authentication=authentication, **kwargs)

    @classmethod
    def from_config(cls, meter: Meter, link: TcpLink | SerialLink, env: Mapping[str, str] | None = None,
                    **kwargs: Any) -> DlmsSession:  # fmt: skip
        """A session for a registry meter on a `dlms-wrapper` or `dlms-hdlc` link."""
        env = os.environ if env is None else env
        settings = meter.dlms or DlmsSettings()

        def secret(name: str | None, what: str) -> str | None:
            if name is None:
                return None
            if name not in env:
                raise Refused(f"{what} variable {name} is not set", meter=meter.id)
            return env[name]

        password = secret(settings.password_env, "LLS password")
        if settings.authentication == codec.AUTH_HLS_GMAC:
            try:
                kwargs["keys"] = codec.Keys(
                    bytes.fromhex(secret(settings.encryption_key_env, "encryption key") or ""),
                    bytes.fromhex(secret(settings.authentication_key_env, "authentication key") or ""),
                )
            except ValueError:
                raise Refused("HLS-GMAC keys must be 32 hex digits (AES-128)", meter=meter.id) from None
        common: dict[str, Any] = {
            "authentication": settings.authentication,
            "password": password.encode() if password is not None else None,
            "client_sap": settings.client_sap,
            "timeout": link.timeout.total_seconds(), "ct": meter.ct.factor if meter.ct else 1.0,
            "session_deadline": link.session_deadline.total_seconds(), "lenient": link.dlms_lenient,
            "pt": meter.pt.factor if meter.pt else 1.0, **kwargs,
        }  # fmt: skip
        if link.protocol == "dlms-wrapper" and isinstance(link, TcpLink):
            return cls.tcp_wrapper(link.host, link.port, meter.id, server_sap=settings.server_sap, **common)
        hdlc_addr = {"server_logical": settings.logical, "server_physical": settings.physical}
        if link.protocol == "dlms-hdlc" and isinstance(link, TcpLink):
            return cls.hdlc_tcp(link.host, link.port, meter.id, **hdlc_addr, **common)
        if link.protocol == "dlms-hdlc" and isinstance(link, SerialLink):
            return cls.hdlc_serial(link.device, meter.id, baudrate=link.baudrate, **hdlc_addr, **common)
        raise Unsupported(f"link {link.id} ({link.protocol}) does not carry DLMS", meter=meter.id)

    def __repr__(self) -> str:  # the password stays out of logs and tracebacks
        return f"DlmsSession({self.meter!r}, {self.transport.where}, auth={self.authentication})"

    # -- association -----------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._deadline = asyncio.get_running_loop().time() + self.session_deadline
        await self.transport.open()
        try:
            if self.authentication == codec.AUTH_HLS_GMAC:
                await self._associate_hls_gmac()
            else:
                reply = await self.transport.exchange(codec.aarq(self.authentication, self._password))
                result = self._parse_aare(reply)
                if not result.accepted:
                    raise Refused(f"association rejected: {result.diagnostic}", meter=self.meter)
        except BaseException:
            await self.transport.close()
            raise
        return self

    def _parse_aare(self, reply: bytes) -> codec.AssociationResult:
        if reply[:1] == bytes([xdlms.EXCEPTION_RESPONSE]) and len(reply) >= 3:
            # Some meters refuse an AARQ they cannot take (a wrong client address, a busy
            # association) with an ExceptionResponse instead of a rejecting AARE: a refusal.
            refusal = xdlms.ExceptionResult(reply[1], reply[2])
            raise Refused(f"association refused by an exception response: {refusal.describe()}", meter=self.meter)
        try:
            return codec.parse_aare(reply)
        except codec.AcseError as exc:
            raise self.transport.bad(str(exc), reply) from None

    def _next_counter(self) -> int:
        assert self.counters is not None and self.keys is not None
        keys = self.keys.encryption + self.keys.authentication
        return self.counters.reserve(self.counters.scope(self.system_title, keys))

    async def _reserve_counter(self) -> int:
        """The next invocation counter, committed (fsynced) in a thread: one per ciphered
        request, and the event loop serves every other meter meanwhile. Reserved one at a
        time, so a meter sees one increasing counter whichever process talks to it."""
        return await asyncio.to_thread(self._next_counter)

    async def _associate_hls_gmac(self) -> None:
        """AARQ/AARE with ciphered initiate, then the HLS passes 3 and 4 (GMAC over the challenges)."""
        assert self.keys is not None
        client_challenge = secrets.token_bytes(16)
        aarq = codec.aarq(codec.AUTH_HLS_GMAC, client_challenge, system_title=self.system_title, keys=self.keys,
                          counter=await self._reserve_counter())  # fmt: skip
        result = self._parse_aare(await self.transport.exchange(aarq))
        if not result.accepted:
            raise Refused(f"association rejected: {result.diagnostic}", meter=self.meter)
        if not (result.system_title and result.challenge and result.ciphered_initiate):
            raise self.transport.bad("HLS-GMAC AARE without system title, challenge or ciphered initiate", b"")
        try:
            codec.decrypt(codec.SC_AUTH_ENC, result.system_title, result.ciphered_initiate.invocation_counter,
                          self.keys, result.ciphered_initiate.text)  # fmt: skip
        except codec.AcseError:
            raise Refused("the meter's AARE does not decrypt with our keys (wrong keys?)", meter=self.meter) from None
        self.protection = Protection(self.keys, self.system_title, result.system_title, self._next_counter,
                                     peer_counter=result.ciphered_initiate.invocation_counter)  # fmt: skip
        reply = hls_reply(self.system_title, await self._reserve_counter(), self.keys, result.challenge)
        try:
            answer = await self.action(15, CURRENT_ASSOCIATION, 1, reply)
        except MeterError as exc:
            raise Refused(f"meter refused our HLS reply: {exc}", meter=self.meter) from None
        if not isinstance(answer, bytes) or not hls_check(answer, result.system_title, self.keys, client_challenge):
            raise Refused("meter failed HLS-GMAC authentication (its reply does not verify)", meter=self.meter)

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc_type is None and self.transport.is_open:
                with contextlib.suppress(MeterError):
                    await self.transport.exchange(codec.rlrq())
                await self.transport.release_link()
        finally:
            # Also when the release itself is cancelled (a stopping runner): the socket is
            # closed, not left to the garbage collector.
            await self.transport.close()

    def _bad(self, what: str, raw: bytes) -> BadFrame:
        return self.transport.bad(what, raw)

    async def _close(self) -> None:
        await self.transport.close()

    async def _service(self, request_bytes: bytes) -> xdlms.GetResult | xdlms.SetResult | xdlms.ActionResult:
        if asyncio.get_running_loop().time() > self._deadline:
            await self._close()
            raise Timeout(f"session deadline ({self.session_deadline:g} s) passed", meter=self.meter)
        plain = request_bytes
        if self.protection is not None:
            request_bytes = self.protection.wrap(request_bytes, await self._reserve_counter())
        reply = await self.transport.exchange(request_bytes)
        try:
            if self.protection is not None and reply[:1] != bytes([xdlms.EXCEPTION_RESPONSE]):
                reply = self.protection.unwrap(reply)
            response = xdlms.parse_response(reply)
        except ProtectionError as exc:
            await self._close()
            raise self._bad(str(exc), exc.raw) from None
        except (xdlms.XdlmsError, axdr.AxdrError) as exc:
            await self._close()
            raise self._bad(str(exc), reply) from None
        if isinstance(response, xdlms.ExceptionResult):
            raise Refused(f"exception response: {response.describe()}", meter=self.meter)
        asked = plain[2] if len(plain) > 2 else None
        if response.invoke_id != asked:
            # An answer to another request (sent twice, or late): taking it would shift every answer after it.
            await self._close()
            raise self._bad(f"answer for invoke id 0x{response.invoke_id:02x}, asked 0x{asked or 0:02x}", reply)
        return response

    def _next_invoke(self) -> int:
        self._invoke = (self._invoke + 1) % 16
        return 0xC0 | self._invoke  # service class confirmed, high priority

    # -- COSEM services ----------------------------------------------------------------------

    async def get(self, class_id: int, obis: Obis, attribute: int, *, selector: int | None = None,
                  parameters: bytes = b"") -> Any:  # fmt: skip
        invoke = self._next_invoke()
        request = xdlms.GetRequest(invoke, xdlms.Attribute(class_id, obis, attribute), selector, parameters)
        response = await self._service(request.to_bytes())
        data = bytearray()
        blocks = 0
        while True:
            if not isinstance(response, xdlms.GetResult):
                raise self._bad("GET answered with another service", b"")
            if response.error is not None:
                raise _access_error(response.error, f"GET {class_id}/{obis}/{attribute}", self.meter)
            data += response.data or b""
            if response.block_number is None or response.last_block:
                break
            blocks += 1  # counted here: a meter's own numbers can repeat forever
            if response.block_number != blocks:
                await self._close()
                raise self._bad(f"GET {class_id}/{obis}/{attribute}: block {response.block_number} where block "
                                f"{blocks} was due", bytes(data[:64]))  # fmt: skip
            if len(data) > self.max_get_bytes or blocks >= self.max_get_blocks:
                await self._close()
                raise self._bad(f"GET {class_id}/{obis}/{attribute}: more than {self.max_get_bytes} bytes or "
                                f"{self.max_get_blocks} blocks and no end in sight", bytes(data[:64]))  # fmt: skip
            response = await self._service(xdlms.GetRequestNext(invoke, response.block_number).to_bytes())
        try:
            if not (self.lenient and blocks):
                return axdr.decode(bytes(data))
            value, used = axdr.decode_prefix(bytes(data))
            if used != len(data) and not _ignorable_tail(value, bytes(data[used:])):
                axdr.decode(bytes(data))  # raises, with what is left named
        except axdr.AxdrError as exc:
            await self._close()
            raise self._bad(f"GET {obis}/{attribute}: {exc}", bytes(data)) from None
        if used != len(data):
            trailing_bytes_ignored[self.meter] += 1
            log.warning("%s: GET %s/%s: %d bytes after the value ignored (lenient link): %s", self.meter, obis,
                        attribute, len(data) - used, bytes(data[used:][:64]).hex())  # fmt: skip
        return value

    async def set(self, class_id: int, obis: Obis, attribute: int, value: Any) -> None:
        request = xdlms.SetRequest(self._next_invoke(), xdlms.Attribute(class_id, obis, attribute), axdr.encode(value))
        response = await self._service(request.to_bytes())
        if not isinstance(response, xdlms.SetResult):
            raise self._bad("SET answered with another service", b"")
        if response.result != 0:
            raise _access_error(response.result, f"SET {class_id}/{obis}/{attribute}", self.meter)

    async def action(self, class_id: int, obis: Obis, method: int, parameter: Any = None) -> Any:
        params = None if parameter is None else axdr.encode(parameter)
        request = xdlms.ActionRequest(self._next_invoke(), xdlms.Attribute(class_id, obis, method), params)
        response = await self._service(request.to_bytes())
        if not isinstance(response, xdlms.ActionResult):
            raise self._bad("ACTION answered with another service", b"")
        if response.result != 0:
            raise _access_error(response.result, f"ACTION {class_id}/{obis}/{method}", self.meter)
        return None if response.data is None else axdr.decode(response.data)

    # -- MeterSession ------------------------------------------------------------------------

    async def _scaler_unit(self, obis: Obis, class_id: int = 3) -> tuple[int, int]:
        if obis not in self._scalers:
            value = await self.get(class_id, obis, 3)
            if not isinstance(value, Structure) or len(value) != 2 or not all(isinstance(v, int) for v in value):
                raise self._bad(f"scaler_unit of {obis} is not structure(integer, enum): {value!r}", b"")
            self._scalers[obis] = (int(value[0]), int(value[1]))
        return self._scalers[obis]

    def _reading(self, obis: Obis, raw: int | float, scaler: int, unit_code: int, t: datetime, **kw: Any) -> Reading:
        unit, extra = _UNITS.get(unit_code, (f"unit{unit_code}", 0))
        ratio = transformer_ratio(obis, self.ct, self.pt)
        return Reading.from_raw(
            self.meter, obis, t, raw, scaler=scaler + extra, multiplier=ratio, unit=unit, source=self.source, **kw
        )

    async def read_registers(self, channels: Sequence[Obis]) -> list[Reading]:
        """Registers as read now; a maximum demand (D = 6, an extended register) is stamped with
        the time the meter says it was reached."""
        readings = []
        for obis in channels:
            class_id = 4 if obis.d == 6 else 3
            scaler, unit = await self._scaler_unit(obis, class_id)
            value = await self.get(class_id, obis, 2)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise self._bad(f"value of {obis} is not a number: {value!r}", b"")
            t = self.now()
            if class_id == 4:
                captured = await self.get(4, obis, 5)
                try:
                    t = DateTime.from_bytes(captured).to_utc()
                except axdr.AxdrError as exc:
                    raw = captured if isinstance(captured, bytes) else b""
                    raise self._bad(f"capture time of {obis}: {exc}", raw) from None
            readings.append(self._reading(obis, value, scaler, unit, t, kind="register"))
        return readings

    async def read_billing(self, since: datetime, until: datetime | None = None) -> list[Reading]:
        """The energy registers the meter froze at the end of each day and month (its daily
        and monthly billing profiles) with since < t <= until, as register readings whose
        source names the profile. A meter without them raises Unsupported."""
        readings: list[Reading] = []
        found = False
        for profile, name in BILLING_PROFILES:
            try:
                columns, rows = await self._buffer(profile, since, until or self.now())
            except Unsupported:
                continue
            found = True
            value_cols = [(i, o) for i, (c, o, a) in enumerate(columns) if c in (3, 4) and a == 2]
            scalers = {o: await self._scaler_unit(o, 3) for _i, o in value_cols}
            for t, row in rows:
                for i, obis in value_cols:
                    value = row[i]
                    if isinstance(value, bool) or not isinstance(value, int | float):
                        raise self._bad(f"{name} billing value of {obis} at {t} is not a number: {value!r:.60}", b"")
                    scaler, unit = scalers[obis]
                    reading = self._reading(obis, value, scaler, unit, t, kind="register")
                    readings.append(dataclasses.replace(reading, source=f"{self.source} billing-{name} {profile}"))
        if not found:
            raise Unsupported("no daily or monthly billing profile (0-0:98.1.0, 0-0:98.2.0)", meter=self.meter)
        return readings

    async def read_clock(self) -> datetime:
        value = await self.get(8, CLOCK, 2)
        try:
            return DateTime.from_bytes(value).to_utc()
        except axdr.AxdrError as exc:
            raise self._bad(f"clock is not a date-time: {exc}", value if isinstance(value, bytes) else b"") from None

    async def set_clock(self, t: datetime) -> None:
        await self.set(8, CLOCK, 2, Typed(axdr.OCTET_STRING, axdr.utc_datetime(t)))

    async def _buffer(self, profile: Obis, since: datetime, until: datetime) -> tuple[list[Column], list[Row]]:
        """A profile generic's capture objects and its rows with since < t <= until, read by range
        descriptor (selective access 1). Shared by load profiles and event logs."""
        captured = await self.get(7, profile, 3)
        try:
            columns = _capture_columns(captured)
        except (ValueError, TypeError) as exc:
            raise self._bad(f"capture_objects of {profile}: {exc}", b"") from None
        clock_col = next((i for i, (c, o, _a) in enumerate(columns) if c == 8 and o == CLOCK), None)
        if clock_col is None:
            raise Unsupported(f"profile {profile} does not capture the clock", meter=self.meter)
        restricting = Structure([Typed(axdr.LONG_UNSIGNED, 8), CLOCK.to_bytes(), Typed(axdr.INTEGER, 2),
                                 Typed(axdr.LONG_UNSIGNED, 0)])  # fmt: skip
        descriptor = Structure([
            restricting,
            Typed(axdr.OCTET_STRING, axdr.utc_datetime(since + timedelta(seconds=1))),
            Typed(axdr.OCTET_STRING, axdr.utc_datetime(until)),
            [],
        ])  # fmt: skip
        rows = await self.get(7, profile, 2, selector=1, parameters=axdr.encode(descriptor))
        if not isinstance(rows, list):
            raise self._bad(f"profile buffer is not an array: {type(rows).__name__}", b"")
        out = []
        for row in rows:
            if not isinstance(row, list) or len(row) != len(columns):
                raise self._bad(f"profile row does not match its {len(columns)} capture objects: {row!r:.80}", b"")
            try:
                t = DateTime.from_bytes(row[clock_col]).to_utc()
            except axdr.AxdrError as exc:
                raise self._bad(f"profile row time: {exc}", b"") from None
            if since < t <= until:
                out.append((t, row))
        return columns, out

    async def read_profile(self, profile: Obis, since: datetime, until: datetime | None = None) -> list[Reading]:
        """Intervals with since < t <= until."""
        until = until or self.now()
        columns, rows = await self._buffer(profile, since, until)
        status_col = next((i for i, (c, o, _a) in enumerate(columns) if c == 1 and o.c == 96 and o.d == 10), None)
        value_cols = [(i, o) for i, (c, o, a) in enumerate(columns) if c in (3, 4) and a == 2]
        scalers = {o: await self._scaler_unit(o) for _i, o in value_cols}
        if not rows:
            return []
        # Each column's meter, unit, scaler and multiplier are checked once, in a template
        # reading; each row's status once per distinct status; per value only the number.
        first_t = rows[0][0]
        templates = [(i, self._reading(obis, 0, *scalers[obis], first_t, kind="interval")) for i, obis in value_cols]
        status_qualities: dict[int, tuple[str, ...]] = {0: ()}
        readings = []
        for t, row in rows:
            status = row[status_col] if status_col is not None else 0
            if isinstance(status, bool) or not isinstance(status, int):
                raise self._bad(f"profile status at {t} is not an unsigned: {status!r:.60}", b"")
            qualities = status_qualities.get(status)
            if qualities is None:
                try:
                    qualities = status_qualities[status] = (validate_quality_code(f"1.0.{status}"),)
                except ValueError:
                    raise self._bad(f"profile status at {t} is not a status word: {status!r:.60}", b"") from None
            for i, template in templates:
                value = row[i]
                if value is None:
                    readings.append(Reading(meter=self.meter, channel=template.channel, timestamp=t, value=None,
                                            qualities=(Quality.MISSING, *qualities), source=self.source))  # fmt: skip
                elif isinstance(value, bool) or not isinstance(value, int | float):
                    raise self._bad(f"profile value of {template.channel} at {t} is not a number: {value!r:.60}", b"")
                else:
                    readings.append(template.like(t, value, qualities))
        return readings

    async def read_events(self, since: datetime, until: datetime | None = None) -> list[Reading]:
        """The standard event log's entries with since < t <= until, as event readings."""
        until = until or self.now()
        columns, rows = await self._buffer(EVENT_LOG, since, until)
        code_col = next((i for i, (c, o, _a) in enumerate(columns) if c == 1 and o == EVENT_CODE), None)
        if code_col is None:
            raise Unsupported(f"event log {EVENT_LOG} does not capture the event code {EVENT_CODE}", meter=self.meter)
        events = []
        for t, row in rows:
            code = row[code_col]
            if isinstance(code, bool) or not isinstance(code, int):
                raise self._bad(f"event code at {t} is not an integer: {code!r:.60}", b"")
            events.append((t, code))
        return event_readings(self.meter, events, self.source)

    async def read_relay(self) -> RelayState:
        value = await self.get(70, DISCONNECT_CONTROL, 3)
        if isinstance(value, bool) or not isinstance(value, int) or value not in _CONTROL_STATES:
            raise self._bad(f"control_state {value!r} is not 0, 1 or 2", b"")
        return _CONTROL_STATES[value]

    async def read_control_mode(self) -> int:
        value = await self.get(70, DISCONNECT_CONTROL, 4)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(f"control_mode {value!r} is not an enum", b"")
        return value

    async def operate_relay(self, action: RelayAction) -> None:
        """remote_disconnect (method 1) or remote_reconnect (method 2); confirm with read_relay()."""
        method = 1 if action == RelayAction.DISCONNECT else 2
        await self.action(70, DISCONNECT_CONTROL, method, Typed(axdr.INTEGER, 0))


def _ignorable_tail(value: object, tail: bytes) -> bool:
    """Whether a lenient link may pass over `tail` after a value sent in blocks: only after
    an array or structure (a profile's rows), and only when the tail does not begin like
    one more of its elements (an array whose count is short by one must not lose a row)."""
    if not isinstance(value, list) or not value:
        return False
    first = value[0]
    if isinstance(first, list):
        kind = axdr.STRUCTURE if isinstance(first, Structure) else axdr.ARRAY
        return tail[:2] != bytes([kind, len(first)])
    return True


def _client_sap(authentication: str, client_sap: int | None) -> int:
    if client_sap is not None:
        return client_sap
    return MANAGEMENT_CLIENT if authentication == codec.AUTH_LLS else PUBLIC_CLIENT


def _capture_columns(captured: Any) -> list[Column]:
    if not isinstance(captured, list):
        raise ValueError(f"not an array: {captured!r:.60}")
    columns = []
    for item in captured:
        if (not isinstance(item, Structure) or len(item) != 4 or not isinstance(item[1], bytes)
                or not all(isinstance(item[i], int) and not isinstance(item[i], bool) for i in (0, 2))):  # fmt: skip
            raise ValueError(f"capture object is not structure(class, obis, attribute, index): {item!r:.60}")
        columns.append((item[0], Obis.from_bytes(item[1]), item[2]))
    return columns


def _access_error(code: int, what: str, meter: str) -> MeterError:
    name = xdlms.DAR.get(code, f"result {code}")
    text = f"{what}: {name}"
    if code in (4, 9, 11, 12):
        return Unsupported(text, meter=meter)
    if code in (3, 13):
        return Refused(text, meter=meter)
    if code in (1, 2, 14, 15):
        return Timeout(text, meter=meter)
    return Refused(text, meter=meter)
