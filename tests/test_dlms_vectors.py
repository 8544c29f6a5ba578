"""Worked examples of the DLMS UA Green Book (DLMS UA 1000-2), as data.

Source: the Green Book's examples of an AARQ/AARE with logical-name referencing, the
AES-GCM ciphering of an xDLMS InitiateRequest (system title 4D4D4D0000BC614E, invocation
counter 01234567, EK 000102...0F, AK D0D1...DF), and the HDLC SNRM; the same vectors are
reproduced in the public test suites of dlms-cosem and Gurux. The xDLMS GET/ACTION frames
are the standard encodings of reading the clock and of remote_disconnect.
"""

from __future__ import annotations

from headend.model import Obis
from headend.protocols.dlms import axdr, codec, xdlms
from headend.protocols.dlms.axdr import Typed

GREEN_BOOK_KEYS = codec.Keys(
    bytes.fromhex("000102030405060708090A0B0C0D0E0F"), bytes.fromhex("D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF")
)
SYSTEM_TITLE = bytes.fromhex("4D4D4D0000BC614E")
INITIATE_REQUEST = bytes.fromhex("01011000112233445566778899AABBCCDDEEFF0000065F1F0400007E1F04B0")
CIPHERED_INITIATE = bytes.fromhex(
    "801302FF8A7874133D414CED25B42534D28DB0047720606B175BD52211BE6841DB204D39EE6FDB8E356855"
)
AARQ_LN_NO_SECURITY = bytes.fromhex("601DA109060760857405080101BE10040E01000000065F1F0400007E1F04B0")
AARE_LN_ACCEPTED = bytes.fromhex(
    "6129A109060760857405080101A203020100A305A103020100BE10040E0800065F1F040000501F01F40007"
)
AARQ_CIPHERED_LLS = bytes.fromhex(
    "6066A109060760857405080103A60A04084D4D4D0000BC614E8A0207808B0760857405080201AC0A80083132333435363738"
    "BE34043221303001234567801302FF8A7874133D414CED25B42534D28DB0047720606B175BD52211BE6841DB204D39EE6FDB8E356855"
)
GET_CLOCK = bytes.fromhex("C001C100080000010000FF0200")
ACTION_REMOTE_DISCONNECT = bytes.fromhex("C301C10046000060030AFF01010F00")


def test_aes_gcm_ciphering_of_the_initiate_request() -> None:
    out = codec.encrypt(codec.SC_AUTH_ENC, SYSTEM_TITLE, 0x01234567, GREEN_BOOK_KEYS, INITIATE_REQUEST)
    assert out == CIPHERED_INITIATE
    assert codec.decrypt(codec.SC_AUTH_ENC, SYSTEM_TITLE, 0x01234567, GREEN_BOOK_KEYS, out) == INITIATE_REQUEST


def test_aarq_and_aare_with_logical_names_and_no_security() -> None:
    request = codec.parse_aarq(AARQ_LN_NO_SECURITY)
    assert (request.authentication, request.max_pdu) == (codec.AUTH_NONE, 0x04B0)
    result = codec.parse_aare(AARE_LN_ACCEPTED)
    assert result.accepted and result.max_pdu == 0x01F4


def test_ciphered_aarq_with_lls_decrypts_to_the_initiate_request() -> None:
    request = codec.parse_aarq(AARQ_CIPHERED_LLS)
    assert request.authentication == codec.AUTH_LLS and request.password == b"12345678"
    assert request.system_title == SYSTEM_TITLE
    assert request.ciphered_initiate is not None
    ciphered = request.ciphered_initiate
    assert ciphered.invocation_counter == 0x01234567
    plain = codec.decrypt(codec.SC_AUTH_ENC, SYSTEM_TITLE, ciphered.invocation_counter, GREEN_BOOK_KEYS, ciphered.text)
    assert plain == INITIATE_REQUEST


def test_get_clock_and_remote_disconnect_encode_as_the_standard_frames() -> None:
    get = xdlms.GetRequest(0xC1, xdlms.Attribute(8, Obis(0, 0, 1, 0, 0), 2))
    assert get.to_bytes() == GET_CLOCK and xdlms.parse_request(GET_CLOCK) == get
    action = xdlms.ActionRequest(
        0xC1, xdlms.Attribute(70, Obis(0, 0, 96, 3, 10), 1), axdr.encode(Typed(axdr.INTEGER, 0))
    )
    assert action.to_bytes() == ACTION_REMOTE_DISCONNECT
    assert xdlms.parse_request(ACTION_REMOTE_DISCONNECT) == action
