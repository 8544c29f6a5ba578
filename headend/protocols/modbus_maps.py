"""Modbus register maps: data files in config/meters/*.toml, not code.

A map says, for each channel, the OBIS code it feeds, the function (holding/input), the
0-based protocol address, the data type, word and byte order, scale and unit. It is checked
at load: overlapping registers, addresses past 65535, unknown types and duplicate channels
are refused with the file, the key and the reason. Reads are planned into as few requests
as the map allows: registers within `max_gap` of each other merge into one block of at
most `max_block` (<= 125) registers.
"""

from __future__ import annotations

import itertools
import math
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from headend.config import ConfigError, ObisCode, Strict, read_toml, validate_model
from headend.model import Obis

# The maps live in config/meters/ of the source tree; an installed package finds the copies
# that pyproject's data-files put under <prefix>/share/headend/meters.
_MAP_DIRS = (
    Path(__file__).resolve().parent.parent.parent / "config" / "meters",
    Path(sys.prefix) / "share" / "headend" / "meters",
)
MAPS_DIR = next((d for d in _MAP_DIRS if d.is_dir()), _MAP_DIRS[0])
MODBUS_MAX_REGISTERS = 125

DataType = Literal["u16", "i16", "u32", "i32", "u64", "i64", "float32", "float64"]
Order = Literal["big", "little"]
Function = Literal["holding", "input"]

_WIDTH = {"u16": 1, "i16": 1, "u32": 2, "i32": 2, "u64": 4, "i64": 4, "float32": 2, "float64": 4}
_STRUCT = {"u16": "H", "i16": "h", "u32": "I", "i32": "i", "u64": "Q", "i64": "q", "float32": "f", "float64": "d"}


def width(data_type: DataType) -> int:
    return _WIDTH[data_type]


def decode(registers: Sequence[int], data_type: DataType, word_order: Order, byte_order: Order) -> float:
    """Registers (16-bit ints as the wire delivers them) to a number.

    word_order: which register holds the most significant word (big = first).
    byte_order: byte order inside each register (big = as Modbus sends it).
    """
    if len(registers) != _WIDTH[data_type]:
        raise ValueError(f"{data_type} needs {_WIDTH[data_type]} registers, got {len(registers)}")
    words = list(registers) if word_order == "big" else list(reversed(registers))
    raw = b"".join(w.to_bytes(2, "big" if byte_order == "big" else "little") for w in words)
    value: float = struct.unpack(">" + _STRUCT[data_type], raw)[0]
    return shortest_float32(value) if data_type == "float32" else value


def shortest_float32(value: float) -> float:
    """The shortest decimal that is the same float32: the meter's 12345.106 rather than the
    12345.1064453125 its float32 becomes in a float64 (a bill shows no binary noise)."""
    if not math.isfinite(value):
        return value
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.unpack(">f", struct.pack(">f", candidate))[0] == value:
            return candidate
    return value


def encode(value: float, data_type: DataType, word_order: Order, byte_order: Order) -> list[int]:
    """The inverse of `decode` (used by the simulator and tests)."""
    if data_type.startswith(("u", "i")):
        value = int(value)
    raw = struct.pack(">" + _STRUCT[data_type], value)
    words = [int.from_bytes(raw[i : i + 2], "big" if byte_order == "big" else "little") for i in range(0, len(raw), 2)]
    return words if word_order == "big" else list(reversed(words))


class RegisterSpec(Strict):
    function: Function
    address: int = Field(ge=0, le=65535)
    type: DataType
    word_order: Order | None = None
    byte_order: Order | None = None

    @property
    def width(self) -> int:
        return _WIDTH[self.type]

    @property
    def last(self) -> int:
        return self.address + self.width - 1


class Channel(RegisterSpec):
    obis: ObisCode
    name: str
    #: A power of ten, like a DLMS scaler: value = raw * scale.
    scale: float = 1.0
    unit: str = ""

    @model_validator(mode="after")
    def _power_of_ten(self) -> Channel:
        exponent = math.log10(self.scale) if self.scale > 0 else math.nan
        if not math.isfinite(exponent) or abs(exponent - round(exponent)) > 1e-9 or abs(exponent) > 9:
            raise ValueError(f"scale must be a power of ten (0.001, 0.1, 1, 10 ...), got {self.scale}")
        return self

    @property
    def scaler(self) -> int:
        return round(math.log10(self.scale))


class Relay(Strict):
    """A relay (or the contactor it drives) switched by a coil or a holding register.

    Coil: on = connected. Register: `connected` / `disconnected` are the values written and
    read back.
    """

    kind: Literal["coil", "register"]
    address: int = Field(ge=0, le=65535)
    connected: int = 1
    disconnected: int = 0


class MeterMap(Strict):
    model: str
    manufacturer: str
    source: str
    word_order: Order = "big"
    byte_order: Order = "big"
    max_block: int = Field(MODBUS_MAX_REGISTERS, ge=1, le=MODBUS_MAX_REGISTERS)
    #: Unmapped registers a block may span; 0 for meters that answer exceptions on gaps.
    max_gap: int = Field(0, ge=0, le=MODBUS_MAX_REGISTERS)
    serial: RegisterSpec | None = None
    channels: list[Channel] = Field(min_length=1)
    relay: Relay | None = None

    @model_validator(mode="after")
    def _fits(self) -> MeterMap:
        specs: list[tuple[str, RegisterSpec]] = [(f"channels[{i}]", c) for i, c in enumerate(self.channels)]
        if self.serial is not None:
            specs.append(("serial", self.serial))
        for where, spec in specs:
            if spec.last > 65535:
                raise ValueError(f"{where}: {spec.type} at {spec.address} runs past register 65535")
        for function in ("holding", "input"):
            used = sorted(((s.address, s.last, w) for w, s in specs if s.function == function))
            for (a1, l1, w1), (a2, _l2, w2) in itertools.pairwise(used):
                if a2 <= l1:
                    raise ValueError(f"{w2} ({function} {a2}) overlaps {w1} ({function} {a1}..{l1})")
        seen: dict[Obis, int] = {}
        for i, c in enumerate(self.channels):
            if c.obis in seen:
                raise ValueError(f"channels[{i}]: OBIS {c.obis} is already mapped by channels[{seen[c.obis]}]")
            seen[c.obis] = i
        return self

    def order(self, spec: RegisterSpec) -> tuple[Order, Order]:
        return spec.word_order or self.word_order, spec.byte_order or self.byte_order

    def channel(self, obis: Obis) -> Channel:
        for c in self.channels:
            if c.obis == obis:
                return c
        raise KeyError(obis)

    def decode(self, spec: RegisterSpec, registers: Sequence[int]) -> float:
        word, byte = self.order(spec)
        return decode(registers, spec.type, word, byte)


@dataclass(frozen=True, slots=True)
class Block:
    """One read request: `count` registers of `function` from `address`, serving `channels`."""

    function: Function
    address: int
    count: int
    channels: tuple[Channel, ...]

    def slice(self, registers: Sequence[int], channel: Channel) -> Sequence[int]:
        start = channel.address - self.address
        return registers[start : start + channel.width]


def plan_blocks(meter_map: MeterMap, channels: Iterable[Channel]) -> list[Block]:
    """As few requests as the map allows for these channels."""
    blocks: list[Block] = []
    for function in ("holding", "input"):
        todo = sorted((c for c in channels if c.function == function), key=lambda c: c.address)
        current: list[Channel] = []
        for c in todo:
            if current:
                start = current[0].address
                end = max(x.last for x in current)
                gap = c.address - end - 1
                if gap <= meter_map.max_gap and c.last - start + 1 <= meter_map.max_block:
                    current.append(c)
                    continue
                blocks.append(_block(function, current))
            current = [c]
        if current:
            blocks.append(_block(function, current))
    return blocks


def _block(function: Function, channels: list[Channel]) -> Block:
    start = channels[0].address
    end = max(c.last for c in channels)
    return Block(function, start, end - start + 1, tuple(channels))


def load_map(path: str | Path) -> MeterMap:
    return validate_model(MeterMap, read_toml(path), path)


@cache
def shipped_maps() -> dict[str, MeterMap]:
    """The maps in config/meters/, by file stem (e.g. `eastron-sdm630`)."""
    return {p.stem: load_map(p) for p in sorted(MAPS_DIR.glob("*.toml"))}


def find_map(name: str) -> MeterMap:
    """A shipped map by name, or a map file by path."""
    maps = shipped_maps()
    if name in maps:
        return maps[name]
    path = Path(name)
    if path.suffix == ".toml":
        return load_map(path)
    raise ConfigError(name, [("", f"no meter map {name!r}; shipped: {', '.join(maps)}")])
