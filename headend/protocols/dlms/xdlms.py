"""xDLMS services with logical-name referencing: GET (normal and with data blocks), SET, ACTION.

Both directions (the client sends requests and reads responses; the simulator does the
reverse). Every parser checks lengths and raises `XdlmsError` on anything short or odd.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from headend.model import Obis
from headend.protocols.dlms import axdr

GET_REQUEST = 0xC0
SET_REQUEST = 0xC1
ACTION_REQUEST = 0xC3
GET_RESPONSE = 0xC4
SET_RESPONSE = 0xC5
ACTION_RESPONSE = 0xC7
EXCEPTION_RESPONSE = 0xD8
NORMAL = 0x01
NEXT = 0x02
WITH_BLOCK = 0x02

# Data-access-result and action-result codes (Green Book), the ones that matter here.
DAR = {
    0: "success",
    1: "hardware-fault",
    2: "temporary-failure",
    3: "read-write-denied",
    4: "object-undefined",
    9: "object-class-inconsistent",
    11: "object-unavailable",
    12: "type-unmatched",
    13: "scope-of-access-violated",
    14: "data-block-unavailable",
    15: "long-get-aborted",
    16: "no-long-get-in-progress",
    250: "other-reason",
}


class XdlmsError(ValueError):
    pass


@dataclass(frozen=True)
class Attribute:
    class_id: int
    obis: Obis
    index: int

    def to_bytes(self) -> bytes:
        return struct.pack(">H", self.class_id) + self.obis.to_bytes() + struct.pack(">b", self.index)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Attribute:
        if len(raw) != 9:
            raise XdlmsError(f"attribute descriptor is 9 bytes, got {len(raw)}")
        return cls(struct.unpack(">H", raw[:2])[0], Obis.from_bytes(raw[2:8]), struct.unpack(">b", raw[8:9])[0])


@dataclass(frozen=True)
class GetRequest:
    invoke_id: int
    attribute: Attribute
    selector: int | None = None
    parameters: bytes = b""

    def to_bytes(self) -> bytes:
        access = b"\x00" if self.selector is None else bytes([1, self.selector]) + self.parameters
        return bytes([GET_REQUEST, NORMAL, self.invoke_id]) + self.attribute.to_bytes() + access


@dataclass(frozen=True)
class GetRequestNext:
    invoke_id: int
    block_number: int

    def to_bytes(self) -> bytes:
        return bytes([GET_REQUEST, NEXT, self.invoke_id]) + struct.pack(">I", self.block_number)


@dataclass(frozen=True)
class SetRequest:
    invoke_id: int
    attribute: Attribute
    data: bytes

    def to_bytes(self) -> bytes:
        return bytes([SET_REQUEST, NORMAL, self.invoke_id]) + self.attribute.to_bytes() + b"\x00" + self.data


@dataclass(frozen=True)
class ActionRequest:
    invoke_id: int
    method: Attribute  # same layout: class, instance, method id
    parameters: bytes | None = None

    def to_bytes(self) -> bytes:
        params = b"\x00" if self.parameters is None else b"\x01" + self.parameters
        return bytes([ACTION_REQUEST, NORMAL, self.invoke_id]) + self.method.to_bytes() + params


def parse_request(apdu: bytes) -> GetRequest | GetRequestNext | SetRequest | ActionRequest:
    if len(apdu) < 3:
        raise XdlmsError(f"request too short: {apdu.hex()}")
    tag, kind, invoke = apdu[0], apdu[1], apdu[2]
    body = apdu[3:]
    if tag == GET_REQUEST and kind == NEXT:
        if len(body) != 4:
            raise XdlmsError(f"get-request-next needs a 4-byte block number: {apdu.hex()}")
        return GetRequestNext(invoke, struct.unpack(">I", body)[0])
    if kind != NORMAL or len(body) < 10:
        raise XdlmsError(f"unsupported or short request: {apdu.hex()}")
    descriptor, flag, rest = Attribute.from_bytes(body[:9]), body[9], body[10:]
    if tag == GET_REQUEST:
        if flag == 0:
            return GetRequest(invoke, descriptor)
        if not rest:
            raise XdlmsError("selective access without a selector")
        return GetRequest(invoke, descriptor, rest[0], bytes(rest[1:]))
    if tag == SET_REQUEST:
        if flag != 0:
            raise XdlmsError("selective access on SET is not supported")
        return SetRequest(invoke, descriptor, bytes(rest))
    if tag == ACTION_REQUEST:
        return ActionRequest(invoke, descriptor, bytes(rest) if flag else None)
    raise XdlmsError(f"unknown request tag 0x{tag:02x}")


# --------------------------------------------------------------------------- responses


@dataclass(frozen=True)
class GetResult:
    """A GET answer: `data` (A-XDR bytes) or an access error, possibly one block of many."""

    invoke_id: int
    data: bytes | None = None
    error: int | None = None
    block_number: int | None = None
    last_block: bool = True

    def to_bytes(self) -> bytes:
        if self.block_number is None:
            result = b"\x00" + (self.data or b"") if self.error is None else bytes([1, self.error])
            return bytes([GET_RESPONSE, NORMAL, self.invoke_id]) + result
        head = bytes([GET_RESPONSE, WITH_BLOCK, self.invoke_id, int(self.last_block)]) + struct.pack(
            ">I", self.block_number
        )
        if self.error is not None:
            return head + bytes([1, self.error])
        raw = self.data or b""
        return head + b"\x00" + axdr.encode_length(len(raw)) + raw


@dataclass(frozen=True)
class SetResult:
    invoke_id: int
    result: int

    def to_bytes(self) -> bytes:
        return bytes([SET_RESPONSE, NORMAL, self.invoke_id, self.result])


@dataclass(frozen=True)
class ActionResult:
    invoke_id: int
    result: int
    data: bytes | None = None

    def to_bytes(self) -> bytes:
        ret = b"\x00" if self.data is None else b"\x01\x00" + self.data
        return bytes([ACTION_RESPONSE, NORMAL, self.invoke_id, self.result]) + ret


@dataclass(frozen=True)
class ExceptionResult:
    state_error: int
    service_error: int

    def to_bytes(self) -> bytes:
        return bytes([EXCEPTION_RESPONSE, self.state_error, self.service_error])

    def describe(self) -> str:
        """The errors by their names in the standard (Green Book, ExceptionResponse)."""
        state = _STATE_ERRORS.get(self.state_error, f"state error {self.state_error}")
        service = _SERVICE_ERRORS.get(self.service_error, f"service error {self.service_error}")
        return f"{state}, {service}"


_STATE_ERRORS = {1: "service-not-allowed", 2: "service-unknown"}
_SERVICE_ERRORS = {1: "operation-not-possible", 2: "service-not-supported", 3: "other-reason", 4: "pdu-too-long",
                   5: "deciphering-error", 6: "invocation-counter-error"}  # fmt: skip


def parse_response(apdu: bytes) -> GetResult | SetResult | ActionResult | ExceptionResult:
    if len(apdu) < 3:
        raise XdlmsError(f"response too short: {apdu.hex()}")
    tag = apdu[0]
    if tag == EXCEPTION_RESPONSE:
        return ExceptionResult(apdu[1], apdu[2])
    kind, invoke, body = apdu[1], apdu[2], apdu[3:]
    if tag == GET_RESPONSE and kind == NORMAL:
        if not body:
            raise XdlmsError("get-response without a result")
        if body[0] == 0:
            axdr.decode(body[1:])  # validate now: the whole value must be there
            return GetResult(invoke, data=bytes(body[1:]))
        if len(body) != 2:
            raise XdlmsError(f"get-response error of odd length: {apdu.hex()}")
        return GetResult(invoke, error=body[1])
    if tag == GET_RESPONSE and kind == WITH_BLOCK:
        if len(body) < 6:
            raise XdlmsError(f"get-response-with-datablock too short: {apdu.hex()}")
        last, number, choice, rest = bool(body[0]), struct.unpack(">I", body[1:5])[0], body[5], body[6:]
        if choice == 1:
            return GetResult(invoke, error=rest[0] if rest else 250, block_number=number, last_block=last)
        raw, used = _octets(rest)
        if used != len(rest):
            raise XdlmsError(f"{len(rest) - used} stray bytes after a data block")
        return GetResult(invoke, data=raw, block_number=number, last_block=last)
    if tag == SET_RESPONSE and kind == NORMAL and len(body) == 1:
        return SetResult(invoke, body[0])
    if tag == ACTION_RESPONSE and kind == NORMAL and body:
        result, rest = body[0], body[1:]
        if not rest or rest[0] == 0:
            return ActionResult(invoke, result)
        if len(rest) < 2:
            raise XdlmsError(f"action-response return parameters cut short: {apdu.hex()}")
        if rest[1] == 0:
            axdr.decode(rest[2:])
            return ActionResult(invoke, result, bytes(rest[2:]))
        return ActionResult(invoke, rest[2] if len(rest) > 2 else 250)
    raise XdlmsError(f"unexpected response 0x{tag:02x}/0x{kind:02x}: {apdu[:32].hex()}")


def _octets(raw: bytes) -> tuple[bytes, int]:
    r = axdr.Reader(raw)
    n = r.length()
    return r.take(n), r.pos


def encode_value(value: Any) -> bytes:
    return axdr.encode(value)
