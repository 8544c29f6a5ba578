"""Domain types shared by every part of the head-end.

Timestamps are timezone-aware UTC; an interval read is stamped with the END of its interval.
Values are in the base unit after the meter's scaler and the site's CT/PT multiplier; the raw
value, scaler and multiplier are kept so a wrong multiplier can be corrected later.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from functools import lru_cache
from typing import Literal

MAX_METER_ID_LENGTH = 64

ReadingKind = Literal["interval", "register", "event"]
READING_KINDS: tuple[ReadingKind, ...] = ("interval", "register", "event")


class InvalidReading(ValueError):
    """A reading that must not be accepted; the message says which field and why."""


def validate_meter_id(meter: str) -> str:
    """Return `meter` unchanged or raise ValueError saying what is wrong with it.

    Spaces, commas, quotes and any printable unicode are fine (storage escapes them);
    control characters and backslashes are refused because InfluxDB line protocol
    cannot carry them unambiguously in a tag value.
    """
    if not isinstance(meter, str):
        raise ValueError(f"meter id must be a string, got {type(meter).__name__}")
    if not meter or not meter.strip():
        raise ValueError("meter id must not be empty or blank")
    if len(meter) > MAX_METER_ID_LENGTH:
        raise ValueError(f"meter id {meter[:20]!r}... is longer than {MAX_METER_ID_LENGTH} characters")
    if meter != meter.strip():
        raise ValueError(f"meter id {meter!r} has leading or trailing whitespace")
    for ch in meter:
        if ch == "\\":
            raise ValueError(f"meter id {meter!r} contains a backslash")
        if unicodedata.category(ch).startswith("C"):
            raise ValueError(f"meter id {meter!r} contains control character U+{ord(ch):04X}")
    return meter


# A fleet has few distinct meter ids, units and sources, each checked once rather than with
# every reading (a character-by-character check was a tenth of ingest's time).
_valid_meter_id = lru_cache(maxsize=1 << 17)(validate_meter_id)


@lru_cache(maxsize=4096)
def printable(text: str) -> bool:
    return not any(unicodedata.category(ch) == "Cc" for ch in text)


_OBIS_RE = re.compile(r"(\d{1,3})-(\d{1,3}):(\d{1,3})\.(\d{1,3})\.(\d{1,3})(?:\.(\d{1,3}))?", re.ASCII)


@dataclass(frozen=True, order=True, slots=True)
class Obis:
    """An OBIS code (IEC 62056-61), A-B:C.D.E.F, each group 0..255."""

    a: int
    b: int
    c: int
    d: int
    e: int
    f: int = 255

    def __post_init__(self) -> None:
        for name in ("a", "b", "c", "d", "e", "f"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 255:
                raise ValueError(f"OBIS group {name.upper()} must be an integer 0..255, got {value!r}")

    @classmethod
    def parse(cls, text: str) -> Obis:
        """Parse `1-0:1.8.0.255` (or `1-0:1.8.0`, F defaulting to 255)."""
        if not isinstance(text, str):
            raise ValueError(f"OBIS code must be a string like '1-0:1.8.0.255', got {type(text).__name__}")
        match = _OBIS_RE.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"{text!r} is not an OBIS code; expected A-B:C.D.E.F such as '1-0:1.8.0.255'")
        groups = [int(g) for g in match.groups(default="255")]
        for label, value in zip("ABCDEF", groups, strict=True):
            if value > 255:
                raise ValueError(f"{text!r} is not an OBIS code: group {label} is {value}, above 255")
        return cls(*groups)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Obis:
        if len(raw) != 6:
            raise ValueError(f"an OBIS code is 6 bytes, got {len(raw)}: {raw.hex()}")
        return cls(*raw)

    def to_bytes(self) -> bytes:
        return bytes((self.a, self.b, self.c, self.d, self.e, self.f))

    def __str__(self) -> str:
        return f"{self.a}-{self.b}:{self.c}.{self.d}.{self.e}.{self.f}"


#: `Obis.parse`, once per text: a fleet names few channels, and every stored row, concentrator
#: block and config entry names one (parsing each was a visible share of ingest).
parse_obis = lru_cache(maxsize=4096)(Obis.parse)


# Channels every part of the head-end names.
IMPORT_ENERGY = Obis(1, 0, 1, 8, 0)  # +A register, kWh
EXPORT_ENERGY = Obis(1, 0, 2, 8, 0)  # -A register, kWh
IMPORT_INTERVAL = Obis(1, 0, 1, 29, 0)  # +A energy of one recording interval, kWh
LOAD_PROFILE = Obis(1, 0, 99, 1, 0)
DISCONNECT_CONTROL = Obis(0, 0, 96, 3, 10)
EVENT_LOG = Obis(0, 0, 99, 98, 0)  # the meter's standard event log; event readings carry its code as value


class Quality(StrEnum):
    """IEC 61968-9 reading-quality codes used by the head-end (system 2 = head-end).

    A meter's own status codes (system 1) pass through as plain strings.
    """

    VALID = "1.0.0"
    VALIDATED = "2.0.1"
    MISSING = "2.5.259"
    FAILED_VALIDATION = "2.6.0"
    EDITED = "2.7.0"
    ESTIMATED = "2.8.0"
    CLOCK_ERROR = "1.2.0"
    #: Head-end flag: read from a meter whose clock was off by more than the plan's tolerance.
    CLOCK_DRIFT = "2.6.16"
    #: Head-end flag (data collection): the interval's stamp was corrected by the meter's clock
    #: offset measured in the same session (this project's code within system 2, category 4).
    TIME_ADJUSTED = "2.4.128"


#: Meter status bits (IDIS AMR profile status), passed through as quality "1.0.<status>":
#: the meter's clock was invalid, the supply was off.
CLOCK_INVALID_BIT = 0x20
POWER_DOWN_BIT = 0x80


def meter_status(qualities: Iterable[str]) -> int:
    """The status bits a meter gave a reading (its "1.0.<status>" qualities)."""
    bits = 0
    for q in qualities:
        if q.startswith("1.0."):
            bits |= int(q.rsplit(".", 1)[1])
    return bits


# fullmatch and ASCII: "1.0.1\n" and other scripts' digits are not codes (the text is stored).
_QUALITY_RE = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,5}", re.ASCII)


def validate_quality_code(code: str) -> str:
    if not isinstance(code, str) or not _QUALITY_RE.fullmatch(code):
        raise ValueError(f"{code!r} is not an IEC 61968-9 quality code (system.category.index, e.g. '2.5.259')")
    return code


def to_utc(ts: datetime, what: str = "timestamp") -> datetime:
    if not isinstance(ts, datetime):
        raise ValueError(f"{what} must be a datetime, got {type(ts).__name__}")
    if ts.tzinfo is None or ts.utcoffset() is None:
        raise ValueError(f"{what} {ts.isoformat()} has no timezone; readings are stamped in UTC")
    try:
        return ts.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:59-23:59 is past the last datetime in UTC
        raise ValueError(f"{what} {ts.isoformat()} is out of range") from None


def exact_product(a: float, b: float, scaler: int = 0) -> float:
    """a x b x 10^scaler computed in decimal: 12.345 x 40 is 493.8, not 493.79999999999995."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return a * b * 10.0**scaler
    return float((Decimal(repr(float(a))) * Decimal(repr(float(b)))).scaleb(scaler))


def exact_difference(a: float, b: float) -> float:
    """a - b computed in decimal: 12383.426 - 12345.106 is 38.32, not 38.32000000006519."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return a - b
    return float(Decimal(repr(float(a))) - Decimal(repr(float(b))))


def _scaled(raw: float, scaler: int, multiplier: float) -> float:
    """raw x 10^scaler x multiplier, exact in decimal where it matters."""
    if multiplier == 1.0 and float(raw).is_integer():
        # Dividing by 10**-scaler keeps 12345 with scaler -3 at exactly 12.345.
        return raw / 10.0**-scaler if scaler < 0 else raw * 10.0**scaler
    return exact_product(raw, multiplier, scaler)


@dataclass(frozen=True, slots=True)
class Reading:
    """One value of one channel of one meter.

    `value` is None only for a marked gap (quality `2.5.259` missing); otherwise it is a
    finite number. Identity in storage is (kind, meter, channel, timestamp).
    """

    meter: str
    channel: Obis
    timestamp: datetime
    value: float | None
    unit: str = ""
    kind: ReadingKind = "interval"
    raw: float | None = None
    scaler: int = 0
    multiplier: float = 1.0
    qualities: tuple[str, ...] = ()
    source: str = ""
    collected_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __post_init__(self) -> None:
        try:
            _valid_meter_id(self.meter) if isinstance(self.meter, str) else validate_meter_id(self.meter)
        except ValueError as exc:
            raise InvalidReading(f"meter: {exc}") from None
        if not isinstance(self.channel, Obis):
            raise InvalidReading(f"channel must be an Obis, got {self.channel!r}")
        if self.kind not in READING_KINDS:
            raise InvalidReading(f"kind must be one of {READING_KINDS}, got {self.kind!r}")
        try:
            object.__setattr__(self, "timestamp", to_utc(self.timestamp))
            object.__setattr__(self, "collected_at", to_utc(self.collected_at, "collected_at"))
        except ValueError as exc:
            raise InvalidReading(str(exc)) from None
        self._check_number("value", self.value, optional=True)
        self._check_number("raw", self.raw, optional=True)
        self._check_number("multiplier", self.multiplier, optional=False)
        if self.multiplier <= 0:
            raise InvalidReading(f"multiplier must be positive, got {self.multiplier!r}")
        if not isinstance(self.scaler, int) or isinstance(self.scaler, bool) or not -128 <= self.scaler <= 127:
            raise InvalidReading(f"scaler must be an integer -128..127, got {self.scaler!r}")
        object.__setattr__(self, "qualities", tuple(self.qualities))
        try:
            for code in self.qualities:
                validate_quality_code(code)
        except ValueError as exc:
            raise InvalidReading(f"qualities: {exc}") from None
        if self.value is None and Quality.MISSING not in self.qualities:
            raise InvalidReading(
                f"reading of {self.meter} {self.channel} at {self.timestamp.isoformat()} has no value "
                f"but is not marked missing ({Quality.MISSING.value})"
            )
        for name in ("unit", "source"):
            text = getattr(self, name)
            if not isinstance(text, str) or not printable(text):
                raise InvalidReading(f"{name} must be a string without control characters, got {text!r}")

    def _check_number(self, name: str, value: object, *, optional: bool) -> None:
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidReading(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise InvalidReading(
                f"{name} of {self.meter} {self.channel} at {self.timestamp} is {value!r}; "
                "only finite numbers are stored (mark a gap with value=None and quality 2.5.259)"
            )
        object.__setattr__(self, name, float(value))

    @classmethod
    def stored(cls, **fields: object) -> Reading:
        """A reading read back from a store this head-end wrote, without checking it again.

        Everything in a store passed `__post_init__` on its way in; re-checking tens of
        thousands of rows per query was most of the cost of validating a meter's month.
        """
        reading = object.__new__(cls)
        for name in cls.__slots__:
            object.__setattr__(reading, name, fields[name])
        return reading

    def like(self, timestamp: datetime, raw: int | float, qualities: tuple[str, ...]) -> Reading:
        """Another value of this reading's meter and channel (same kind, unit, source, scaler,
        multiplier, collection time), from the meter's raw number, as `from_raw` computes it.

        A profile is hundreds of values sharing everything but time, value and status: the
        shared fields were checked when this reading was made, only the number is checked per
        value here. The caller vouches for the rest: `timestamp` an aware UTC datetime,
        `qualities` valid codes (checked once per distinct status, not per value).
        """
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise InvalidReading(f"raw must be a number, got {raw!r}")
        value = _scaled(raw, self.scaler, self.multiplier) if math.isfinite(raw) else math.inf
        if not math.isfinite(value):
            raise InvalidReading(f"value of {self.meter} {self.channel} at {timestamp} is not finite (raw {raw!r}, "
                                 f"scaler {self.scaler}, multiplier {self.multiplier}); "
                                 "only finite numbers are stored")  # fmt: skip
        reading = object.__new__(Reading)
        put = object.__setattr__
        put(reading, "value", value)
        put(reading, "meter", self.meter)
        put(reading, "channel", self.channel)
        put(reading, "timestamp", timestamp)
        put(reading, "unit", self.unit)
        put(reading, "kind", self.kind)
        put(reading, "raw", float(raw))
        put(reading, "scaler", self.scaler)
        put(reading, "multiplier", self.multiplier)
        put(reading, "qualities", qualities)
        put(reading, "source", self.source)
        put(reading, "collected_at", self.collected_at)
        return reading

    @classmethod
    def from_raw(
        cls,
        meter: str,
        channel: Obis,
        timestamp: datetime,
        raw: float,
        *,
        scaler: int = 0,
        multiplier: float = 1.0,
        **kwargs: object,
    ) -> Reading:
        """Build a reading from the meter's raw integer, its scaler and the site multiplier."""
        return cls(
            meter=meter,
            channel=channel,
            timestamp=timestamp,
            value=_scaled(raw, scaler, multiplier),
            raw=raw,
            scaler=scaler,
            multiplier=multiplier,
            **kwargs,  # type: ignore[arg-type]
        )

    @property
    def identity(self) -> tuple[str, str, str, datetime]:
        return (self.kind, self.meter, str(self.channel), self.timestamp)


# OBIS value groups C that instrument-transformer ratios scale: currents the CT ratio only,
# voltages the PT ratio only, frequency and power factor neither; power and energy both.
_CT_ONLY = frozenset({11, 31, 51, 71, 91})
_PT_ONLY = frozenset({12, 32, 52, 72})
_NO_RATIO = frozenset({13, 14, 33, 53, 73})


def transformer_ratio(channel: Obis, ct: float, pt: float) -> float:
    """The multiplier a CT/PT-connected meter's secondary-side value of `channel` needs."""
    if channel.c in _NO_RATIO:
        return 1.0
    if channel.c in _CT_ONLY:
        return ct
    if channel.c in _PT_ONLY:
        return pt
    return ct * pt


class RelayState(StrEnum):
    """Relay state as read back from the meter (DLMS class 70 control_state)."""

    DISCONNECTED = "disconnected"
    CONNECTED = "connected"
    READY_FOR_RECONNECTION = "ready_for_reconnection"


class RelayAction(StrEnum):
    DISCONNECT = "disconnect"
    RECONNECT = "reconnect"


def event_readings(meter: str, events: list[tuple[datetime, int]], source: str) -> list[Reading]:
    """Event log entries as readings on the EVENT_LOG channel, value = event code.

    Storage identity is (kind, meter, channel, timestamp), so entries logged in the same
    second are kept apart by shifting each later one by a microsecond, in log order.
    """
    readings: list[Reading] = []
    last: datetime | None = None
    for t, code in sorted(events, key=lambda e: e[0]):
        stamp = to_utc(t, "event time")
        if last is not None and stamp <= last:
            stamp = last + timedelta(microseconds=1)
        readings.append(Reading(meter=meter, channel=EVENT_LOG, timestamp=stamp, value=float(code), kind="event",
                                raw=float(code), source=source))  # fmt: skip
        last = stamp
    return readings
