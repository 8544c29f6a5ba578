"""HDLC (IEC 62056-46) without I/O: bytes in, events out, bytes to send.

One `HdlcConnection` is one end of a link: the client (head-end) or the server (a meter).
It keeps what the link's state is made of (connected or not, the send and receive sequence
numbers N(S)/N(R), the information field size negotiated by SNRM/UA, an APDU's segments
waiting for the peer's RR, a segmented APDU being received) and never reads or writes
anything itself: the DLMS client's transport and the meter simulator's bus both drive it
(the same code on both ends, so they cannot drift apart), and tests drive it with bytes.

Window size 1, as DLMS meters use it: one I-frame, then wait for the answer or the RR.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from headend.protocols.dlms.hdlc import (
    DEFAULT_MAX_INFO,
    DISC,
    DM,
    FLAG,
    LLC_REQUEST,
    LLC_RESPONSE,
    MAX_INFO_RX,
    MAX_INFO_TX,
    SNRM,
    UA,
    Frame,
    HdlcError,
    information_control,
    parse,
    parse_parameters,
    rr_control,
    segments,
    snrm_parameters,
)

#: The largest APDU DLMS allows (max PDU size 65535) plus the LLC header: a segmented APDU
#: past it is a peer that never stops talking, not data.
MAX_APDU = 0xFFFF + 3
#: Information field sizes an end may offer (IEC 62056-46: 32 to 2030 bytes, 128 by default).
MIN_INFO, MAX_INFO = 32, 2030
#: Bytes of line noise kept to show in errors (a meter at the wrong baud rate or parity).
NOISE_KEPT = 64


@dataclass(frozen=True)
class Connected:
    """The link is up (the client got UA to its SNRM; the server got an SNRM)."""

    #: The longest information field this end sends, as negotiated.
    send_info: int


@dataclass(frozen=True)
class Refused:
    """The server answered the client's SNRM with DM (disconnected mode)."""


@dataclass(frozen=True)
class Disconnected:
    """The link is down (DISC answered, or the peer said DM)."""


@dataclass(frozen=True)
class Received:
    """A whole APDU from the peer, its segments joined and the LLC header removed."""

    apdu: bytes


Event = Connected | Refused | Disconnected | Received


class FrameReader:
    """Bytes in, frames out: a frame is found by its opening flag and its length field (a
    0x7E inside it is data); inter-frame flags and line noise are skipped, counted and the
    last of them kept (`noise`), so a line at the wrong speed or parity can be told apart
    from a silent one. A flag may close one frame and open the next."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        #: Bytes passed over as noise so far, and the last of them.
        self.noise_bytes = 0
        self.noise = b""

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered(self) -> bytes:
        """What was received and is not yet a whole frame."""
        return bytes(self._buffer)

    def _skip(self, n: int) -> None:
        self.noise_bytes += n
        self.noise = (self.noise + bytes(self._buffer[:n]))[-NOISE_KEPT:]
        del self._buffer[:n]

    def next_frame(self) -> Frame | None:
        """The next whole frame, or None until more bytes come. A damaged frame raises
        HdlcError with its bytes; only its opening flag is passed over, so a real frame that
        began inside it is still found."""
        buf = self._buffer
        while True:
            start = buf.find(FLAG)
            if start < 0:
                self._skip(len(buf))  # nothing in it can start a frame
                return None
            if start:
                self._skip(start)
            if len(buf) < 3:
                return None
            if buf[1] == FLAG:
                del buf[:1]  # a closing flag before an opening one
                continue
            if buf[1] & 0xF0 != 0xA0:
                self._skip(1)  # noise that held a flag byte
                continue
            length = int.from_bytes(buf[1:3], "big") & 0x7FF
            if length < 7:
                raw = bytes(buf[:3])
                self._skip(1)
                raise HdlcError(f"HDLC length {length} is too short", raw)
            if len(buf) < length + 2:
                later = self._frame_after_noise()
                if later is None:
                    return None
                return later
            raw = bytes(buf[: length + 2])
            try:
                frame = parse(raw)
            except HdlcError:
                self._skip(1)
                raise
            del buf[: length + 1]  # its closing flag may open the next frame
            return frame

    def _frame_after_noise(self) -> Frame | None:
        """While waiting for a long frame: a whole, sound frame further on means the start
        was noise that looked like a frame's beginning."""
        buf = self._buffer
        at = buf.find(FLAG, 1)
        while at > 0:
            if at + 3 <= len(buf) and buf[at + 1] & 0xF0 == 0xA0:
                length = int.from_bytes(buf[at + 1 : at + 3], "big") & 0x7FF
                if length >= 7 and at + length + 2 <= len(buf):
                    try:
                        frame = parse(bytes(buf[at : at + length + 2]))
                    except HdlcError:
                        frame = None
                    if frame is not None:
                        self._skip(at)
                        del buf[: length + 1]
                        return frame
            at = buf.find(FLAG, at + 1)
        return None


class HdlcConnection:
    def __init__(self, local: bytes, remote: bytes, *, server: bool, max_info: int = DEFAULT_MAX_INFO) -> None:
        """`local`, `remote`: the two ends' encoded HDLC addresses; `max_info`: the longest
        information field this end sends and takes before negotiation lowers it."""
        if not MIN_INFO <= max_info <= MAX_INFO:
            raise ValueError(f"HDLC information field size must be {MIN_INFO}..{MAX_INFO}, got {max_info}")
        self.local = local
        self.remote = remote
        self.server = server
        self.max_info = max_info
        #: The longest information field the peer takes (negotiated at connect).
        self.send_info = max_info
        #: The longest information field this end has sent.
        self.largest_sent = 0
        self.connected = False
        self._connecting = self._disconnecting = False
        self._send_seq = self._recv_seq = 0
        self._frames = FrameReader()
        self._out: list[bytes] = []
        self._segments: deque[bytes] = deque()
        #: The last I-frame sent, for an RR that asks for it again.
        self._last_sent: tuple[int, bytes, bool] | None = None
        self._incoming = bytearray()
        self._llc_out, self._llc_in = (LLC_RESPONSE, LLC_REQUEST) if server else (LLC_REQUEST, LLC_RESPONSE)

    # -- what to send --------------------------------------------------------------------

    def connect(self) -> None:
        """(Client) SNRM, proposing this end's information field size."""
        self._reset()
        self._connecting = True
        self._queue(SNRM, snrm_parameters(self.max_info))

    def disconnect(self) -> None:
        """(Client) DISC."""
        self._disconnecting = True
        self._queue(DISC)

    def send(self, apdu: bytes) -> None:
        """An APDU, in as many I-frames as the negotiated size needs (the next one after the
        peer's RR for the one before)."""
        if not self.connected:
            raise HdlcError("cannot send on an HDLC link that is not connected")
        self._segments = deque(segments(self._llc_out + apdu, self.send_info))
        self._send_segment()

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def buffered(self) -> bytes:
        """Bytes received that are not yet a whole frame (for the error when the line closes)."""
        return self._frames.buffered

    @property
    def frames(self) -> FrameReader:
        """The frame reader (its count of line noise and the last of it)."""
        return self._frames

    # -- what came -----------------------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Bytes from the line; frames between other stations are passed over."""
        self._frames.feed(data)
        events: list[Event] = []
        while (frame := self._frames.next_frame()) is not None:
            if frame.destination == self.local and frame.source == self.remote:
                events += self.receive_frame(frame)
        return events

    def receive_frame(self, frame: Frame) -> list[Event]:
        """One frame addressed to this end, from its peer."""
        control = frame.control
        if self.server:
            if control == SNRM:
                return self._snrm(frame)
            if control == DISC:
                was, self.connected = self.connected, False
                self._queue(UA if was else DM)
                return [Disconnected()] if was else []
            if not self.connected:
                self._queue(DM)
                return []
        else:
            if self._connecting:
                self._connecting = False
                if control == DM:
                    return [Refused()]
                if control != UA:
                    raise HdlcError(f"expected UA to SNRM, got control 0x{control:02x}")
                params = parse_parameters(frame.info)
                self.send_info = min(self.max_info, _offered(params, MAX_INFO_RX))
                self.connected = True
                return [Connected(self.send_info)]
            if control in (UA, DM) and (self._disconnecting or control == DM):
                self._disconnecting = self.connected = False
                return [Disconnected()]
        if frame.is_rr:
            if frame.receive_sequence == (self._send_seq - 1) % 8 and self._last_sent is not None:
                self._resend()  # it asks for the last frame again (it did not take it)
            elif frame.receive_sequence != self._send_seq:
                raise HdlcError(f"RR N(R) {frame.receive_sequence}, expected {self._send_seq}")
            elif self._segments:
                self._send_segment()
            return []  # otherwise nothing waits for it
        if self._segments:
            raise HdlcError(f"expected RR between segments, got control 0x{control:02x}")
        if not frame.is_information:
            raise HdlcError(f"expected an I-frame, got control 0x{control:02x}")
        if not self.connected:
            raise HdlcError("an I-frame on an HDLC link that is not connected")
        if frame.send_sequence != self._recv_seq:
            raise HdlcError(f"I-frame N(S) {frame.send_sequence}, expected {self._recv_seq}")
        if frame.receive_sequence != self._send_seq:
            # It does not acknowledge what this end sent last: not the answer to it.
            raise HdlcError(f"I-frame N(R) {frame.receive_sequence}, expected {self._send_seq}")
        self._recv_seq = (self._recv_seq + 1) % 8
        self._incoming += frame.info
        if len(self._incoming) > MAX_APDU:
            raise HdlcError(f"segmented APDU over {MAX_APDU} bytes, longer than any", bytes(self._incoming[:16]))
        if frame.segmented:
            self._queue(rr_control(self._recv_seq))
            return []
        data, self._incoming = bytes(self._incoming), bytearray()
        if not data.startswith(self._llc_in):
            raise HdlcError(f"APDU lacks the LLC header {self._llc_in.hex(' ').upper()}", data[:16])
        return [Received(data[len(self._llc_in) :])]

    # -- inside --------------------------------------------------------------------------

    def _snrm(self, frame: Frame) -> list[Event]:
        """(Server) What the client proposes (128 where it says nothing) against this end's
        own size; window 1 whatever it offers."""
        self._reset()
        proposed = parse_parameters(frame.info)
        self.send_info = min(self.max_info, _offered(proposed, MAX_INFO_RX))
        receive = min(self.max_info, _offered(proposed, MAX_INFO_TX))
        self.connected = True
        self._queue(UA, snrm_parameters(self.send_info, 1, receive=receive))
        return [Connected(self.send_info)]

    def _reset(self) -> None:
        self._send_seq = self._recv_seq = 0
        self._segments.clear()
        self._incoming = bytearray()
        self._last_sent = None

    def _send_segment(self) -> None:
        part = self._segments.popleft()
        self.largest_sent = max(self.largest_sent, len(part))
        self._last_sent = (self._send_seq, part, bool(self._segments))
        control = information_control(self._send_seq, self._recv_seq)
        self._send_seq = (self._send_seq + 1) % 8
        self._queue(control, part, bool(self._segments))

    def _resend(self) -> None:
        assert self._last_sent is not None
        seq, part, segmented = self._last_sent
        self._queue(information_control(seq, self._recv_seq), part, segmented)

    def _queue(self, control: int, info: bytes = b"", segmented: bool = False) -> None:
        self._out.append(Frame(self.remote, self.local, control, info, segmented).to_bytes())


def _offered(params: dict[int, int], key: int) -> int:
    """An information field size from an SNRM or UA (128 where it names none); one outside
    32..2030 is the peer's error, never a size to cut frames by."""
    size = params.get(key, DEFAULT_MAX_INFO)
    if not MIN_INFO <= size <= MAX_INFO:
        raise HdlcError(f"HDLC information field size {size} offered; {MIN_INFO}..{MAX_INFO} allowed")
    return size
