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
       client_info=st.integers(16, 256), server_info=st.integers(16, 256),
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
