"""Random and truncated frames fed to the DLMS client over real sockets: every session ends
with a MeterSession error within its timeout; none hangs, none raises anything else."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headend.model import Obis
from headend.protocols.base import MeterError
from headend.protocols.dlms import codec, hdlc
from headend.protocols.dlms.client import DlmsSession
from headend.protocols.dlms.hdlc_link import FrameReader
from headend.protocols.dlms.wrapper import WrapperFrame

GOOD_AARE = codec.aare(True)


def answer(mode: str, payload: bytes) -> bytes:
    if mode == "wrapped":  # a valid wrapper around garbage
        return WrapperFrame(1, 16, payload or b"\x00").to_bytes()
    if mode == "truncated":  # a real AARE cut short, with an honest or a lying length
        cut = GOOD_AARE[: len(payload) % len(GOOD_AARE)]
        return WrapperFrame(1, 16, cut or b"\x61").to_bytes()
    if mode == "after_aare":  # association works, then the GET answer is garbage
        return WrapperFrame(1, 16, GOOD_AARE).to_bytes() + WrapperFrame(1, 16, b"\xc4\x01\xc1\x00" + payload).to_bytes()
    return payload  # raw bytes, no framing at all


CALLS: dict[str, tuple[object, ...]] = {
    "read_clock": (),
    "read_relay": (),
    "read_control_mode": (),
    "read_registers": ([Obis(1, 0, 1, 8, 0)],),
    "read_profile": (Obis(1, 0, 99, 1, 0), datetime(2026, 1, 1, tzinfo=UTC)),
}


async def scenario(mode: str, payload: bytes, call: str) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.read(4096)
            writer.write(answer(mode, payload))
            await writer.drain()
            await reader.read(4096)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(5):  # the session's own timeout is 0.3 s: this only catches a hang
            try:
                async with DlmsSession.tcp_wrapper("127.0.0.1", port, "FUZZ", timeout=0.3) as s:
                    await getattr(s, call)(*CALLS[call])
            except MeterError:
                pass
    finally:
        server.close()
        await server.wait_closed()


@settings(derandomize=True, max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(["wrapped", "truncated", "after_aare", "raw"]),
    st.binary(max_size=300),
    st.sampled_from(list(CALLS)),
)
def test_no_answer_can_hang_or_crash_a_session(mode: str, payload: bytes, call: str) -> None:
    asyncio.run(scenario(mode, payload, call))


@settings(derandomize=True, max_examples=300, deadline=200)
@given(st.binary(max_size=300))
def test_random_hdlc_bytes_never_hang_the_frame_reader(raw: bytes) -> None:
    reader = FrameReader()
    reader.feed(b"\x7e" + raw)
    for _ in range(len(raw) + 2):  # each step consumes bytes: it ends
        try:
            if reader.next_frame() is None:
                break
        except hdlc.HdlcError:
            continue
    else:
        raise AssertionError("the reader never ran out of frames")
