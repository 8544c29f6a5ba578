"""Register maps are data: the shipped ones load, decode like pymodbus, and bad ones are refused."""

from __future__ import annotations

import math
import random
import struct
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusTcpClient

from headend.config import ConfigError
from headend.protocols.modbus_maps import decode, encode, load_map, plan_blocks, shipped_maps

DATATYPE = AsyncModbusTcpClient.DATATYPE
PYMODBUS_TYPE = {
    "u16": DATATYPE.UINT16,
    "i16": DATATYPE.INT16,
    "u32": DATATYPE.UINT32,
    "i32": DATATYPE.INT32,
    "u64": DATATYPE.UINT64,
    "i64": DATATYPE.INT64,
    "float32": DATATYPE.FLOAT32,
    "float64": DATATYPE.FLOAT64,
}
RANGES = {"u16": (0, 2**16 - 1), "i16": (-(2**15), 2**15 - 1), "u32": (0, 2**32 - 1), "i32": (-(2**31), 2**31 - 1)}
RANGES |= {"u64": (0, 2**64 - 1), "i64": (-(2**63), 2**63 - 1)}


def test_at_least_three_real_models_ship_with_energy_power_voltage_current() -> None:
    maps = shipped_maps()
    real = {name: m for name, m in maps.items() if m.manufacturer != "headend"}
    assert len(real) >= 3
    for name, m in real.items():
        codes = {str(c.obis) for c in m.channels}
        for needed in ("1-0:1.8.0.255", "1-0:2.8.0.255", "1-0:16.7.0.255", "1-0:32.7.0.255", "1-0:31.7.0.255"):
            assert needed in codes, f"{name} lacks {needed}"


def test_reads_are_coalesced_into_few_requests() -> None:
    maps = shipped_maps()
    assert len(plan_blocks(maps["eastron-sdm630"], maps["eastron-sdm630"].channels)) == 1
    for m in maps.values():
        for block in plan_blocks(m, m.channels):
            assert block.count <= 125
            assert block.count <= m.max_block


@pytest.mark.parametrize("name", sorted(shipped_maps()))
def test_every_channel_decodes_like_pymodbus(name: str) -> None:
    """Cross-check our codec against pymodbus's convert_from_registers for each map's orders."""
    m = shipped_maps()[name]
    rng = random.Random(name)
    for channel in m.channels:
        word, byte = m.order(channel)
        for _ in range(50):
            if channel.type.startswith("float"):
                value = rng.uniform(-1e6, 1e6)
            else:
                lo, hi = RANGES[channel.type]
                value = rng.randint(lo, hi)
            registers = encode(value, channel.type, word, byte)
            ours = decode(registers, channel.type, word, byte)
            # pymodbus takes big-endian bytes inside words; swap first for byte-swapped maps.
            wire = registers if byte == "big" else [int.from_bytes(r.to_bytes(2, "little"), "big") for r in registers]
            theirs = AsyncModbusTcpClient.convert_from_registers(wire, PYMODBUS_TYPE[channel.type], word_order=word)
            if channel.type == "float32":  # ours is the shortest decimal of the same float32
                assert struct.pack(">f", ours) == struct.pack(">f", theirs) and len(repr(ours)) <= 12  # type: ignore[arg-type]
            else:
                assert ours == theirs or (math.isclose(ours, theirs) and channel.type.startswith("float"))  # type: ignore[arg-type]


def test_em24_sends_the_low_word_first() -> None:
    m = shipped_maps()["carlo-gavazzi-em24"]
    energy = m.channel(next(c.obis for c in m.channels if c.name == "kWh (+) total"))
    # 123456.7 kWh = 1234567 units of 0.1 kWh = 0x0012D687: low word 0xD687 travels first.
    assert m.decode(energy, [0xD687, 0x0012]) * energy.scale == pytest.approx(123456.7)


BAD_MAPS = [
    pytest.param(
        '[[channels]]\nobis="1-0:1.8.0.255"\nname="a"\nfunction="input"\naddress=0\ntype="float32"\n'
        '[[channels]]\nobis="1-0:2.8.0.255"\nname="b"\nfunction="input"\naddress=1\ntype="float32"',
        "",
        "channels[1] (input 1) overlaps channels[0] (input 0..1)",
        id="overlap",
    ),
    pytest.param(
        '[[channels]]\nobis="1-0:1.8.0.255"\nname="a"\nfunction="holding"\naddress=65534\ntype="u64"',
        "",
        "runs past register 65535",
        id="past-65535",
    ),
    pytest.param(
        '[[channels]]\nobis="1-0:1.8.0.255"\nname="a"\nfunction="input"\naddress=0\ntype="float16"',
        "channels[0].type",
        "Input should be 'u16', 'i16'",
        id="unknown-type",
    ),
    pytest.param(
        '[[channels]]\nobis="1-0:1.8.0.255"\nname="a"\nfunction="input"\naddress=70000\ntype="u16"',
        "channels[0].address",
        "less than or equal to 65535",
        id="address-out-of-range",
    ),
    pytest.param(
        '[[channels]]\nobis="1-0:1.8.0.255"\nname="a"\nfunction="input"\naddress=0\ntype="u16"\n'
        '[[channels]]\nobis="1-0:1.8.0.255"\nname="b"\nfunction="input"\naddress=4\ntype="u16"',
        "",
        "already mapped by channels[0]",
        id="duplicate-obis",
    ),
    pytest.param(
        '[[channels]]\nobis="1-0:1.8.0.255"\nname="a"\nfunction="coil"\naddress=0\ntype="u16"',
        "channels[0].function",
        "Input should be 'holding' or 'input'",
        id="bad-function",
    ),
    pytest.param(
        '[[channels]]\nobis="1-0:1.8.0.255"\nname="a"\nfunction="input"\naddress=0\ntype="u16"\nscale=0.5',
        "channels[0]",
        "scale must be a power of ten",
        id="scale-not-power-of-ten",
    ),
    pytest.param(
        'max_block = 200\n[[channels]]\nobis="1-0:1.8.0.255"\nname="a"\nfunction="input"\naddress=0\ntype="u16"',
        "max_block",
        "less than or equal to 125",
        id="block-over-125",
    ),
]


@pytest.mark.parametrize(("body", "key", "reason"), BAD_MAPS)
def test_bad_map_is_refused_with_file_key_and_reason(tmp_path: Path, body: str, key: str, reason: str) -> None:
    path = tmp_path / "bad-meter.toml"
    path.write_text(f'model = "X"\nmanufacturer = "Y"\nsource = "test"\n{body}\n')
    with pytest.raises(ConfigError) as info:
        load_map(path)
    assert str(path) in str(info.value)
    assert any(p == key and reason in why for p, why in info.value.problems), info.value.problems
