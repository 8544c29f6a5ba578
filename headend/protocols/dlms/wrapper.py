"""The DLMS/COSEM TCP-UDP wrapper (IEC 62056-47): version, source and destination wPort, length."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass

WRAPPER_VERSION = 1
HEADER = struct.Struct(">HHHH")
MAX_APDU = 0xFFFF


class WrapperError(ValueError):
    """A wrapper frame that is not one; `raw` holds what was read."""

    def __init__(self, message: str, raw: bytes) -> None:
        super().__init__(message)
        self.raw = raw


@dataclass(frozen=True)
class WrapperFrame:
    source: int
    destination: int
    apdu: bytes

    def to_bytes(self) -> bytes:
        return HEADER.pack(WRAPPER_VERSION, self.source, self.destination, len(self.apdu)) + self.apdu


def parse_header(raw: bytes) -> tuple[int, int, int]:
    version, source, destination, length = HEADER.unpack(raw)
    if version != WRAPPER_VERSION:
        raise WrapperError(f"wrapper version {version}, expected {WRAPPER_VERSION}", raw)
    if length == 0:
        raise WrapperError("wrapper frame with an empty APDU", raw)
    return source, destination, length


async def read_frame(reader: asyncio.StreamReader) -> WrapperFrame:
    """Read one frame; the length field bounds the read, so garbage cannot make it wait forever
    (the caller's timeout covers a peer that stops mid-frame)."""
    header = await reader.readexactly(HEADER.size)
    source, destination, length = parse_header(header)
    return WrapperFrame(source, destination, await reader.readexactly(length))
