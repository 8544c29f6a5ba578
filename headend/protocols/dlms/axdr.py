"""A-XDR encoding of COSEM data (IEC 62056-6-2 / Green Book), bounded.

Written here rather than taken from dlms-cosem because its decoder loops forever on
truncated input (`b"\\x0f"`): this one checks every length against what is left and raises
`AxdrError` instead, so no input can hang a task. Decoded values are plain Python: None,
bool, int, float, bytes (octet-string), str (visible/utf8-string), `DateTime`, list
(array) and `Structure` (structure). Encoding takes `Typed(tag, value)` where the type is
not obvious from the Python value.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

NULL = 0x00
ARRAY = 0x01
STRUCTURE = 0x02
BOOLEAN = 0x03
BIT_STRING = 0x04
DOUBLE_LONG = 0x05
DOUBLE_LONG_UNSIGNED = 0x06
OCTET_STRING = 0x09
VISIBLE_STRING = 0x0A
UTF8_STRING = 0x0C
BCD = 0x0D
INTEGER = 0x0F
LONG = 0x10
UNSIGNED = 0x11
LONG_UNSIGNED = 0x12
LONG64 = 0x14
LONG64_UNSIGNED = 0x15
ENUM = 0x16
FLOAT32 = 0x17
FLOAT64 = 0x18
DATE_TIME = 0x19
DATE = 0x1A
TIME = 0x1B

_FIXED = {
    BOOLEAN: ">?",
    DOUBLE_LONG: ">i",
    DOUBLE_LONG_UNSIGNED: ">I",
    BCD: ">b",
    INTEGER: ">b",
    LONG: ">h",
    UNSIGNED: ">B",
    LONG_UNSIGNED: ">H",
    LONG64: ">q",
    LONG64_UNSIGNED: ">Q",
    ENUM: ">B",
    FLOAT32: ">f",
    FLOAT64: ">d",
}
MAX_DEPTH = 16
MAX_ELEMENTS = 1_000_000


class AxdrError(ValueError):
    """Bytes that are not valid A-XDR (truncated, unknown tag, absurd length)."""


class Structure(list[Any]):
    """A COSEM structure (as opposed to an array, which decodes to a plain list)."""


@dataclass(frozen=True)
class Typed:
    tag: int
    value: Any


@dataclass(frozen=True)
class DateTime:
    """A COSEM date-time: the wall-clock fields, the deviation and the clock status.

    `deviation` is minutes such that UTC = local time + deviation (the Blue Book's
    convention: UTC+1 is -60); None when the meter leaves it unspecified (0x8000).
    """

    local: datetime
    deviation: int | None
    status: int = 0

    def to_utc(self) -> datetime:
        if self.deviation is None:
            return self.local.replace(tzinfo=UTC)
        return (self.local + timedelta(minutes=self.deviation)).replace(tzinfo=UTC)

    @classmethod
    def from_datetime(cls, t: datetime, status: int = 0) -> DateTime:
        if t.tzinfo is None:
            raise ValueError("a COSEM date-time needs an aware datetime")
        offset = t.utcoffset() or timedelta(0)
        return cls(t.replace(tzinfo=None), -int(offset.total_seconds() // 60), status)

    def to_bytes(self) -> bytes:
        t = self.local
        deviation = 0x8000 if self.deviation is None else self.deviation & 0xFFFF
        hundredths = t.microsecond // 10_000
        return struct.pack(
            ">HBBBBBBBHB", t.year, t.month, t.day, t.isoweekday(), t.hour, t.minute, t.second, hundredths,
            deviation, self.status,
        )  # fmt: skip

    @classmethod
    def from_bytes(cls, raw: object) -> DateTime:
        if not isinstance(raw, bytes | bytearray):
            raise AxdrError(f"a date-time is a 12-byte octet-string, got {type(raw).__name__}: {raw!r:.60}")
        raw = bytes(raw)
        if len(raw) != 12:
            raise AxdrError(f"a date-time is 12 bytes, got {len(raw)}: {raw.hex()}")
        year, month, day, _dow, hour, minute, second, hundredths, deviation, status = struct.unpack(">HBBBBBBBHB", raw)
        if 0xFF in (month, day, hour, minute) or year == 0xFFFF:
            raise AxdrError(f"date-time with unspecified fields is not a point in time: {raw.hex()}")
        hundredths = 0 if hundredths == 0xFF else hundredths
        second = 0 if second == 0xFF else second
        try:
            local = datetime(year, month, day, hour, minute, second, hundredths * 10_000)
        except ValueError as exc:
            raise AxdrError(f"date-time {raw.hex()}: {exc}") from None
        dev = None if deviation == 0x8000 else struct.unpack(">h", struct.pack(">H", deviation))[0]
        return cls(local, dev, status)


def utc_datetime(t: datetime) -> DateTime:
    """A COSEM date-time in UTC (deviation 0)."""
    return DateTime.from_datetime(t.astimezone(UTC))


def local_datetime(t: datetime, offset_minutes: int) -> DateTime:
    return DateTime.from_datetime(t.astimezone(timezone(timedelta(minutes=offset_minutes))))


# --------------------------------------------------------------------------- decoding


class Reader:
    """A cursor over A-XDR bytes: `take(n)` bytes, a `length()` prefix; AxdrError past the end.
    Public for the modules that read A-XDR framing by hand (ciphered APDUs, octet strings)."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.raw):
            raise AxdrError(f"truncated: need {n} bytes at offset {self.pos}, {len(self.raw) - self.pos} left")
        out = self.raw[self.pos : self.pos + n]
        self.pos += n
        return out

    def length(self) -> int:
        first = self.take(1)[0]
        if first < 0x80:
            return first
        size = first & 0x7F
        if size == 0 or size > 4:
            raise AxdrError(f"bad length prefix 0x{first:02x} at offset {self.pos - 1}")
        return int.from_bytes(self.take(size), "big")


def _decode(r: Reader, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise AxdrError(f"nested deeper than {MAX_DEPTH}")
    tag = r.take(1)[0]
    if tag == NULL:
        return None
    if tag in (ARRAY, STRUCTURE):
        n = r.length()
        # Every element takes at least one byte: a count beyond what is left is a lie.
        if n > len(r.raw) - r.pos or n > MAX_ELEMENTS:
            raise AxdrError(f"{'array' if tag == ARRAY else 'structure'} of {n} elements in {len(r.raw) - r.pos} bytes")
        items = [_decode(r, depth + 1) for _ in range(n)]
        return Structure(items) if tag == STRUCTURE else items
    if tag in _FIXED:
        fmt = _FIXED[tag]
        return struct.unpack(fmt, r.take(struct.calcsize(fmt)))[0]
    if tag == OCTET_STRING:
        return r.take(r.length())
    if tag in (VISIBLE_STRING, UTF8_STRING):
        raw = r.take(r.length())
        try:
            return raw.decode("ascii" if tag == VISIBLE_STRING else "utf-8")
        except UnicodeDecodeError as exc:
            raise AxdrError(f"string is not {'ASCII' if tag == VISIBLE_STRING else 'UTF-8'}: {raw.hex()}") from exc
    if tag == BIT_STRING:
        bits = r.length()
        return r.take((bits + 7) // 8)
    if tag == DATE_TIME:
        return DateTime.from_bytes(r.take(12))
    if tag == DATE:
        return r.take(5)
    if tag == TIME:
        return r.take(4)
    raise AxdrError(f"unknown A-XDR tag 0x{tag:02x} at offset {r.pos - 1}")


def decode(raw: bytes) -> Any:
    """Decode exactly one value; trailing bytes are an error."""
    value, used = decode_prefix(raw)
    if used != len(raw):
        raise AxdrError(f"{len(raw) - used} bytes left after the value: {raw[used:][:32].hex()}")
    return value


def decode_prefix(raw: bytes) -> tuple[Any, int]:
    """Decode one value from the start of `raw`; return it and the bytes it used."""
    r = Reader(bytes(raw))
    return _decode(r, 0), r.pos


# --------------------------------------------------------------------------- encoding


def encode_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    size = (n.bit_length() + 7) // 8
    return bytes([0x80 | size]) + n.to_bytes(size, "big")


def encode(value: Any) -> bytes:
    if isinstance(value, Typed):
        return _encode_typed(value.tag, value.value)
    if value is None:
        return bytes([NULL])
    if isinstance(value, bool):
        return bytes([BOOLEAN, int(value)])
    if isinstance(value, Structure):
        return bytes([STRUCTURE]) + encode_length(len(value)) + b"".join(encode(v) for v in value)
    if isinstance(value, list):
        return bytes([ARRAY]) + encode_length(len(value)) + b"".join(encode(v) for v in value)
    if isinstance(value, bytes | bytearray):
        return bytes([OCTET_STRING]) + encode_length(len(value)) + bytes(value)
    if isinstance(value, str):
        raw = value.encode("ascii")
        return bytes([VISIBLE_STRING]) + encode_length(len(raw)) + raw
    if isinstance(value, DateTime):
        return bytes([DATE_TIME]) + value.to_bytes()
    if isinstance(value, float):
        return _encode_typed(FLOAT64, value)
    if isinstance(value, int):
        return _encode_typed(DOUBLE_LONG if value < 0 else DOUBLE_LONG_UNSIGNED, value)
    raise TypeError(f"cannot A-XDR-encode {type(value).__name__}: {value!r}")


def _encode_typed(tag: int, value: Any) -> bytes:
    if tag in _FIXED:
        return bytes([tag]) + struct.pack(_FIXED[tag], value)
    if tag == DATE_TIME:
        return bytes([tag]) + value.to_bytes()
    if tag == OCTET_STRING and isinstance(value, DateTime):
        return bytes([tag, 12]) + value.to_bytes()
    return encode(value)
