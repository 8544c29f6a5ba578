"""HDLC frames for DLMS/COSEM (IEC 62056-46, frame format type 3): addresses, control
fields, HCS/FCS, the SNRM/UA parameter field. Reading frames from bytes and the link's state
are in hdlc_link.py (frames are found by their length field, not by flag bytes: 0x7E may
legally appear inside a frame). Lengths are bounded by the 11-bit format field; anything
that is not a sound frame raises `HdlcError` with the raw bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

FLAG = 0x7E
SNRM = 0x93
UA = 0x73
DISC = 0x53
DM = 0x1F
FRMR = 0x97
LLC_REQUEST = b"\xe6\xe6\x00"
LLC_RESPONSE = b"\xe6\xe7\x00"
MAX_FRAME = 0x7FF
DEFAULT_MAX_INFO = 128


class HdlcError(ValueError):
    def __init__(self, message: str, raw: bytes = b"") -> None:
        super().__init__(message)
        self.raw = raw


def crc16(data: bytes) -> int:
    """CRC-16/X-25 as HDLC's HCS and FCS use it."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
    return crc ^ 0xFFFF


#: The largest server address part: four-byte addresses carry 14 bits in each half.
MAX_ADDRESS_PART = 0x3FFF


def encode_address(upper: int, lower: int | None = None) -> bytes:
    """A one-byte address, or the server address (upper = logical, lower = physical): two
    bytes when both parts fit in 7 bits, else four (meters addressed by their serial number
    use physical addresses up to 16,383)."""
    if lower is None:
        if not 0 <= upper <= 0x7F:
            raise ValueError(f"one-byte HDLC address must be 0..127, got {upper}")
        return bytes([(upper << 1) | 1])
    if not (0 <= upper <= MAX_ADDRESS_PART and 0 <= lower <= MAX_ADDRESS_PART):
        raise ValueError(f"HDLC server address parts must be 0..{MAX_ADDRESS_PART}, got {upper}/{lower}")
    if upper <= 0x7F and lower <= 0x7F:
        return bytes([upper << 1, (lower << 1) | 1])
    return bytes([(upper >> 7) << 1, (upper & 0x7F) << 1, (lower >> 7) << 1, ((lower & 0x7F) << 1) | 1])


def _split_address(body: bytes, start: int) -> tuple[bytes, int]:
    for end in range(start, min(start + 4, len(body))):
        if body[end] & 1:
            size = end - start + 1
            if size == 3:
                raise HdlcError("a 3-byte HDLC address is not allowed", body)
            return body[start : end + 1], end + 1
    raise HdlcError("HDLC address does not end within 4 bytes", body)


def address_parts(raw: bytes) -> tuple[int, int | None]:
    if len(raw) == 1:
        return raw[0] >> 1, None
    half = len(raw) // 2
    upper = int.from_bytes(raw[:half], "big")
    lower = int.from_bytes(raw[half:], "big")

    # Each byte carries 7 bits: squeeze out the extension bits.
    def squeeze(value: int, nbytes: int) -> int:
        out = 0
        for i in range(nbytes):
            out = (out << 7) | ((value >> (8 * (nbytes - 1 - i) + 1)) & 0x7F)
        return out

    return squeeze(upper, half), squeeze(lower, half)


@dataclass(frozen=True)
class Frame:
    destination: bytes
    source: bytes
    control: int
    info: bytes = b""
    segmented: bool = False

    def to_bytes(self) -> bytes:
        header_len = 2 + len(self.destination) + len(self.source) + 1
        length = header_len + (2 + len(self.info) if self.info else 0) + 2
        if length > MAX_FRAME:
            raise ValueError(f"HDLC frame of {length} bytes exceeds {MAX_FRAME}")
        fmt = (0xA000 | (0x0800 if self.segmented else 0) | length).to_bytes(2, "big")
        header = fmt + self.destination + self.source + bytes([self.control])
        body = header
        if self.info:
            body += crc16(header).to_bytes(2, "little") + self.info
        return bytes([FLAG]) + body + crc16(body).to_bytes(2, "little") + bytes([FLAG])

    @property
    def is_information(self) -> bool:
        return self.control & 1 == 0

    @property
    def is_rr(self) -> bool:
        return self.control & 0x0F == 0x01

    @property
    def send_sequence(self) -> int:
        return (self.control >> 1) & 7

    @property
    def receive_sequence(self) -> int:
        return (self.control >> 5) & 7


def information_control(send_seq: int, receive_seq: int, final: bool = True) -> int:
    return ((receive_seq & 7) << 5) | (0x10 if final else 0) | ((send_seq & 7) << 1)


def rr_control(receive_seq: int) -> int:
    return ((receive_seq & 7) << 5) | 0x10 | 0x01


def parse(raw: bytes) -> Frame:
    """Parse one frame including its two flags."""
    if len(raw) < 9 or raw[0] != FLAG or raw[-1] != FLAG:
        raise HdlcError("not a flagged HDLC frame", raw)
    body = raw[1:-1]
    fmt = int.from_bytes(body[:2], "big")
    if fmt & 0xF000 != 0xA000:
        raise HdlcError(f"frame format 0x{fmt:04x} is not type 3", raw)
    if fmt & 0x07FF != len(body):
        raise HdlcError(f"length field {fmt & 0x7FF} but {len(body)} bytes", raw)
    if crc16(body[:-2]) != int.from_bytes(body[-2:], "little"):
        raise HdlcError("FCS mismatch", raw)
    destination, pos = _split_address(body, 2)
    source, pos = _split_address(body, pos)
    if pos >= len(body) - 2:
        raise HdlcError("frame ends before its control field", raw)
    control = body[pos]
    pos += 1
    info = b""
    if pos < len(body) - 2:
        if pos + 2 > len(body) - 2:
            raise HdlcError("frame ends inside its HCS", raw)
        if crc16(body[:pos]) != int.from_bytes(body[pos : pos + 2], "little"):
            raise HdlcError("HCS mismatch", raw)
        info = bytes(body[pos + 2 : -2])
    return Frame(destination, source, control, info, bool(fmt & 0x0800))


#: Parameter ids of the negotiation field, each from the sender's side.
MAX_INFO_TX, MAX_INFO_RX, WINDOW_TX, WINDOW_RX = 0x05, 0x06, 0x07, 0x08


def snrm_parameters(max_info: int = DEFAULT_MAX_INFO, window: int = 1, *, receive: int | None = None) -> bytes:
    """The HDLC parameter negotiation field (ISO/IEC 13239) of SNRM and UA: the longest
    information field the sender sends (`max_info`) and takes (`receive`, default the same)."""
    receive = max_info if receive is None else receive
    params = bytes([MAX_INFO_TX, 2]) + max_info.to_bytes(2, "big")
    params += bytes([MAX_INFO_RX, 2]) + receive.to_bytes(2, "big")
    params += bytes([WINDOW_TX, 4]) + window.to_bytes(4, "big") + bytes([WINDOW_RX, 4]) + window.to_bytes(4, "big")
    return bytes([0x81, 0x80, len(params)]) + params


def parse_parameters(info: bytes) -> dict[int, int]:
    if len(info) < 3 or info[0] != 0x81 or info[1] != 0x80 or info[2] != len(info) - 3:
        return {}
    out, pos = {}, 3
    while pos + 2 <= len(info):
        key, size = info[pos], info[pos + 1]
        out[key] = int.from_bytes(info[pos + 2 : pos + 2 + size], "big")
        pos += 2 + size
    return out


def segments(payload: bytes, max_info: int) -> list[bytes]:
    return [payload[i : i + max_info] for i in range(0, len(payload), max_info)] or [b""]
