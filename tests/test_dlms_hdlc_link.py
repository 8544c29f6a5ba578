"""The sans-IO HDLC connection (issue #16): the client and the meter ends driven with bytes
only, against frames from the Green Book, each other and hypothesis."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from headend.protocols.dlms import hdlc
from headend.protocols.dlms.hdlc_link import (
    Connected,
    Disconnected,
    Event,
    FrameReader,
    HdlcConnection,
    Received,
    Refused,
)

CLIENT, SERVER = hdlc.encode_address(16), hdlc.encode_address(1)
#: The public client's SNRM to the management logical device, as the Green Book prints it
#: (no parameters: both sides' defaults, 128 bytes, window 1).
GREEN_BOOK_SNRM = bytes.fromhex("7EA0070321930F017E")


def pair(client_info: int = 128, server_info: int = 128) -> tuple[HdlcConnection, HdlcConnection]:
    return (HdlcConnection(CLIENT, SERVER, server=False, max_info=client_info),
            HdlcConnection(SERVER, CLIENT, server=True, max_info=server_info))  # fmt: skip


def pump(a: HdlcConnection, b: HdlcConnection, cuts: list[int] | None = None) -> tuple[list[Event], list[Event]]:
    """Move bytes both ways until neither has anything to send, cut into pieces at `cuts`."""
    seen_a: list[Event] = []
    seen_b: list[Event] = []
    for _ in range(10_000):
        to_b, to_a = a.data_to_send(), b.data_to_send()
        if not to_b and not to_a:
            return seen_a, seen_b
        for data, receiver, seen in ((to_b, b, seen_b), (to_a, a, seen_a)):
            for piece in split(data, cuts or []):
                seen += receiver.receive_data(piece)
    raise AssertionError("the two ends never stopped talking")


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[i:j] for i, j in itertools.pairwise(points)] or [b""]


def test_the_green_book_snrm_connects_a_meter_at_the_default_sizes() -> None:
    meter = HdlcConnection(SERVER, CLIENT, server=True, max_info=512)
    assert meter.receive_data(GREEN_BOOK_SNRM) == [Connected(128)]
    ua = hdlc.parse(meter.data_to_send())
    assert ua.control == hdlc.UA and ua.destination == CLIENT and ua.source == SERVER
    params = hdlc.parse_parameters(ua.info)
    assert params[hdlc.MAX_INFO_TX] == params[hdlc.MAX_INFO_RX] == 128 and params[hdlc.WINDOW_RX] == 1


def test_a_client_and_a_meter_connect_exchange_and_disconnect_with_segments() -> None:
    client, meter = pair(client_info=32, server_info=64)
    client.connect()
    got_client, got_meter = pump(client, meter)
    assert got_client == [Connected(32)] and got_meter == [Connected(32)]
    request, answer = bytes(range(100)), bytes(range(256)) * 3
    client.send(request)
    _, got_meter = pump(client, meter)
    assert got_meter == [Received(request)]
    meter.send(answer)
    got_client, _ = pump(client, meter)
    assert got_client == [Received(answer)]
    assert client.largest_sent <= 32 and meter.largest_sent <= 32
    client.disconnect()
    got_client, got_meter = pump(client, meter)
    assert got_client == [Disconnected()] and got_meter == [Disconnected()]


def test_a_meter_not_connected_answers_dm_and_the_client_hears_a_refusal() -> None:
    client, meter = pair()
    meter.receive_data(hdlc.Frame(SERVER, CLIENT, hdlc.DISC).to_bytes())  # not connected: DM
    assert hdlc.parse(meter.data_to_send()).control == hdlc.DM
    client.connect()
    client.data_to_send()
    assert client.receive_data(hdlc.Frame(CLIENT, SERVER, hdlc.DM).to_bytes()) == [Refused()]


def test_an_i_frame_out_of_sequence_is_a_protocol_error() -> None:
    client, meter = pair()
    client.connect()
    pump(client, meter)
    wrong = hdlc.Frame(SERVER, CLIENT, hdlc.information_control(3, 0), hdlc.LLC_REQUEST + b"\xc0").to_bytes()
    with pytest.raises(hdlc.HdlcError, match="N\\(S\\) 3, expected 0"):
        meter.receive_data(wrong)


def test_frames_for_other_stations_are_passed_over() -> None:
    client, _meter = pair()
    client.connect()
    client.data_to_send()
    other = hdlc.Frame(CLIENT, hdlc.encode_address(1, 0x22), hdlc.UA).to_bytes()
    assert client.receive_data(other) == []


@settings(max_examples=200, deadline=None)
@given(request=st.binary(max_size=700), answer=st.binary(max_size=2000),
       client_info=st.integers(32, 256), server_info=st.integers(32, 256),
       cuts=st.lists(st.integers(0, 3000), max_size=12))  # fmt: skip
def test_any_apdu_crosses_whole_at_any_sizes_in_any_split(
    request: bytes, answer: bytes, client_info: int, server_info: int, cuts: list[int]
) -> None:
    client, meter = pair(client_info, server_info)
    client.connect()
    pump(client, meter, cuts)
    client.send(request)
    assert pump(client, meter, cuts)[1] == [Received(request)]
    meter.send(answer)
    assert pump(client, meter, cuts)[0] == [Received(answer)]
    # Each end keeps to the smaller of the two ends' sizes, as SNRM/UA negotiated them.
    assert max(client.largest_sent, meter.largest_sent) <= min(client_info, server_info)


@settings(max_examples=300, deadline=None)
@given(noise=st.binary(max_size=600), cuts=st.lists(st.integers(0, 600), max_size=8), server=st.booleans())
def test_any_bytes_in_any_split_raise_nothing_but_the_protocols_error(
    noise: bytes, cuts: list[int], server: bool
) -> None:
    link = HdlcConnection(SERVER, CLIENT, server=True) if server else HdlcConnection(CLIENT, SERVER, server=False)
    if not server:
        link.connect()
    for piece in split(noise, cuts):
        try:
            link.receive_data(piece)
        except hdlc.HdlcError:
            continue
    assert len(link.buffered) <= len(noise)


@settings(max_examples=200, deadline=None)
@given(frames=st.lists(st.binary(min_size=0, max_size=40), max_size=6), cuts=st.lists(st.integers(0, 800)))
def test_well_formed_frames_among_noise_are_all_found(frames: list[bytes], cuts: list[int]) -> None:
    sent = [hdlc.Frame(CLIENT, SERVER, 0x10, info).to_bytes() for info in frames]
    reader = FrameReader()
    found = []
    for piece in split(b"\x00\x13".join(sent), cuts):
        reader.feed(piece)
        while (frame := reader.next_frame()) is not None:
            found.append(frame.info)
    assert found == frames


# From the attacker pass on #16: what broke then.


def connected_client(ua_info: bytes = b"", max_info: int = 128) -> HdlcConnection:
    client = HdlcConnection(CLIENT, SERVER, server=False, max_info=max_info)
    client.connect()
    client.data_to_send()
    client.receive_data(hdlc.Frame(CLIENT, SERVER, hdlc.UA, ua_info).to_bytes())
    return client


@pytest.mark.parametrize("ua_info", [hdlc.snrm_parameters(128, receive=0), bytes([0x81, 0x80, 2, 6, 0])],
                         ids=["max-info-rx-0", "zero-length-value"])  # fmt: skip
def test_a_ua_offering_impossible_frame_sizes_is_the_protocols_error(ua_info: bytes) -> None:
    client = HdlcConnection(CLIENT, SERVER, server=False)
    client.connect()
    client.data_to_send()
    with pytest.raises(hdlc.HdlcError, match="information field size 0"):
        client.receive_data(hdlc.Frame(CLIENT, SERVER, hdlc.UA, ua_info).to_bytes())


def test_an_i_frame_that_does_not_acknowledge_the_request_is_not_its_answer() -> None:
    client = connected_client()
    client.send(b"REQ1")
    client.data_to_send()
    first = hdlc.Frame(CLIENT, SERVER, hdlc.information_control(0, 1), hdlc.LLC_RESPONSE + b"ANS1").to_bytes()
    assert client.receive_data(first) == [Received(b"ANS1")]
    client.send(b"REQ2")
    client.data_to_send()
    stale = hdlc.Frame(CLIENT, SERVER, hdlc.information_control(1, 1), hdlc.LLC_RESPONSE + b"ANS1 again").to_bytes()
    with pytest.raises(hdlc.HdlcError, match="N\\(R\\) 1, expected 2"):
        client.receive_data(stale)


def test_an_rr_asking_for_a_segment_again_gets_it_again() -> None:
    client = connected_client(hdlc.snrm_parameters(32), max_info=32)
    client.send(bytes(80))
    client.data_to_send()  # the first segment, N(S) 0
    client.receive_data(hdlc.Frame(CLIENT, SERVER, hdlc.rr_control(0)).to_bytes())  # "still waiting for 0"
    again = hdlc.parse(client.data_to_send())
    assert again.send_sequence == 0 and again.segmented
    client.receive_data(hdlc.Frame(CLIENT, SERVER, hdlc.rr_control(1)).to_bytes())
    assert hdlc.parse(client.data_to_send()).send_sequence == 1


def test_noise_that_looks_like_a_long_frame_does_not_swallow_the_frame_after_it() -> None:
    reader = FrameReader()
    real = hdlc.Frame(CLIENT, SERVER, hdlc.UA).to_bytes()
    reader.feed(b"\x7e\xa7\xff" + real)
    assert reader.next_frame() == hdlc.parse(real)
    assert reader.noise_bytes == 3 and reader.noise == b"\x7e\xa7\xff"


def test_one_flag_may_close_a_frame_and_open_the_next() -> None:
    reader = FrameReader()
    first, second = (hdlc.Frame(CLIENT, SERVER, hdlc.rr_control(n)).to_bytes() for n in (1, 2))
    reader.feed(first + second[1:])
    assert [reader.next_frame(), reader.next_frame()] == [hdlc.parse(first), hdlc.parse(second)]
