"""The one module that imports dlms-cosem: ACSE (AARQ / AARE / RLRQ / RLRE) encoding.

Everything else in the DLMS driver goes through here, so the library (BSL 1.1 licensed,
see the package docstring) can be replaced in one place. Its structlog output is switched
off: logging every APDU costs several times the throughput.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import structlog
from dlms_cosem import enumerations, security
from dlms_cosem.protocol import acse
from dlms_cosem.protocol.xdlms import (
    Conformance,
    GlobalCipherInitiateRequest,
    GlobalCipherInitiateResponse,
    InitiateRequest,
    InitiateResponse,
)

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))

AUTH_NONE = "none"
AUTH_LLS = "lls"
AUTH_HLS_GMAC = "hls-gmac"
_MECHANISMS = {
    AUTH_LLS: enumerations.AuthenticationMechanism.LLS,
    AUTH_HLS_GMAC: enumerations.AuthenticationMechanism.HLS_GMAC,
}
SC_AUTH_ENC = 0x30  # security suite 0, authenticated and encrypted
SC_AUTH = 0x10  # security suite 0, authenticated only (HLS-GMAC challenge replies)

# What the simulator offers and the client asks for: get, set, action, selective access,
# block transfer with get.
CONFORMANCE = Conformance(
    block_transfer_with_get_or_read=True,
    selective_access=True,
    get=True,
    set=True,
    action=True,
    priority_management_supported=True,
)


class AcseError(ValueError):
    pass


@dataclass(frozen=True)
class Keys:
    """Global keys of security suite 0 (AES-128). Never logged: repr hides them."""

    encryption: bytes
    authentication: bytes

    def __post_init__(self) -> None:
        if len(self.encryption) != 16 or len(self.authentication) != 16:
            raise ValueError("security suite 0 keys are 16 bytes (AES-128)")

    def __repr__(self) -> str:
        return "Keys(<hidden>)"


@dataclass(frozen=True)
class Ciphered:
    """A glo-initiate request/response as carried in the AARQ/AARE."""

    invocation_counter: int
    text: bytes


@dataclass(frozen=True)
class AssociationRequest:
    authentication: str
    password: bytes | None
    max_pdu: int
    system_title: bytes | None = None
    ciphered_initiate: Ciphered | None = None


@dataclass(frozen=True)
class AssociationResult:
    accepted: bool
    diagnostic: str
    max_pdu: int
    system_title: bytes | None = None
    challenge: bytes | None = None
    ciphered_initiate: Ciphered | None = None


def _sc(value: int) -> security.SecurityControlField:
    return security.SecurityControlField.from_bytes(bytes([value]))


def encrypt(sc: int, system_title: bytes, counter: int, keys: Keys, plain: bytes) -> bytes:
    return bytes(security.encrypt(_sc(sc), system_title, counter, keys.encryption, plain, keys.authentication))


def decrypt(sc: int, system_title: bytes, counter: int, keys: Keys, ciphered: bytes) -> bytes:
    try:
        return bytes(security.decrypt(_sc(sc), system_title, counter, keys.encryption, ciphered, keys.authentication))
    except Exception as exc:  # noqa: BLE001 - an authentication failure: wrong key or tampered data
        raise AcseError(f"cannot decrypt ({type(exc).__name__}): wrong keys or a tampered frame") from None


def gmac(system_title: bytes, counter: int, keys: Keys, challenge: bytes) -> bytes:
    return bytes(security.gmac(_sc(SC_AUTH), system_title, counter, keys.encryption, keys.authentication, challenge))


def aarq(authentication: str = AUTH_NONE, password: bytes | None = None, max_pdu: int = 0xFFFF, *,
         system_title: bytes | None = None, keys: Keys | None = None, counter: int = 0) -> bytes:  # fmt: skip
    """An AARQ; for HLS-GMAC `password` is the client-to-server challenge and the initiate
    request is ciphered with the global keys."""
    initiate = InitiateRequest(proposed_conformance=CONFORMANCE, client_max_receive_pdu_size=max_pdu)
    content: Any = initiate
    if authentication == AUTH_HLS_GMAC:
        if keys is None or system_title is None:
            raise ValueError("HLS-GMAC needs keys and a system title")
        text = encrypt(SC_AUTH_ENC, system_title, counter, keys, initiate.to_bytes())
        content = GlobalCipherInitiateRequest(
            security_control=_sc(SC_AUTH_ENC), invocation_counter=counter, ciphered_text=text
        )
    request = acse.ApplicationAssociationRequest(
        ciphered=authentication == AUTH_HLS_GMAC,
        system_title=system_title if authentication == AUTH_HLS_GMAC else None,
        authentication=_MECHANISMS.get(authentication),
        authentication_value=password if authentication in _MECHANISMS else None,
        user_information=acse.UserInformation(content=content),
    )
    return bytes(request.to_bytes())


def parse_aarq(apdu: bytes) -> AssociationRequest:
    try:
        request = acse.ApplicationAssociationRequest.from_bytes(apdu)
    except Exception as exc:  # noqa: BLE001 - any parser failure is a bad frame
        raise AcseError(f"not an AARQ: {exc}") from None
    info = request.user_information.content if request.user_information else None
    max_pdu = info.client_max_receive_pdu_size if isinstance(info, InitiateRequest) else 0xFFFF
    auth = next((name for name, m in _MECHANISMS.items() if m == request.authentication), AUTH_NONE)
    value = bytes(request.authentication_value) if request.authentication_value else None
    ciphered = None
    if isinstance(info, GlobalCipherInitiateRequest):
        ciphered = Ciphered(info.invocation_counter, bytes(info.ciphered_text))
    title = bytes(request.system_title) if request.system_title else None
    return AssociationRequest(auth, value, max_pdu, title, ciphered)


def client_max_pdu(initiate: bytes) -> int:
    """The client's max receive PDU from a (deciphered) InitiateRequest; 65535 if unreadable."""
    try:
        return int(InitiateRequest.from_bytes(initiate).client_max_receive_pdu_size)
    except Exception:  # noqa: BLE001 - a parser failure of any kind: the default
        return 0xFFFF


def initiate_response_bytes(max_pdu: int = 0xFFFF) -> bytes:
    return bytes(InitiateResponse(negotiated_conformance=CONFORMANCE, server_max_receive_pdu_size=max_pdu).to_bytes())


def aare(accepted: bool, *, authentication: str = AUTH_NONE, failure: str = "authentication_failed",
         max_pdu: int = 0xFFFF, system_title: bytes | None = None, challenge: bytes | None = None,
         keys: Keys | None = None, counter: int = 0) -> bytes:  # fmt: skip
    """An AARE. For HLS-GMAC (accepted) it carries the server's system title and challenge,
    the diagnostic authentication-required, and a ciphered initiate response."""
    users = enumerations.AcseServiceUserDiagnostics
    hls = authentication == AUTH_HLS_GMAC
    diagnostic = (users.AUTHENTICATION_REQUIRED if hls else users.NULL) if accepted else users[failure.upper()]
    content: Any = InitiateResponse(negotiated_conformance=CONFORMANCE, server_max_receive_pdu_size=max_pdu)
    if accepted and hls:
        if keys is None or system_title is None:
            raise ValueError("HLS-GMAC needs keys and a system title")
        text = encrypt(SC_AUTH_ENC, system_title, counter, keys, initiate_response_bytes(max_pdu))
        content = GlobalCipherInitiateResponse(
            security_control=_sc(SC_AUTH_ENC), invocation_counter=counter, ciphered_text=text
        )
    results = enumerations.AssociationResult
    response = acse.ApplicationAssociationResponse(
        result=results.ACCEPTED if accepted else results.REJECTED_PERMANENT,
        result_source_diagnostics=diagnostic,
        ciphered=hls and accepted,
        system_title=system_title if hls and accepted else None,
        authentication=_MECHANISMS.get(authentication),
        authentication_value=challenge if hls and accepted else None,
        user_information=acse.UserInformation(content=content) if accepted else None,
    )
    return bytes(response.to_bytes())


def parse_aare(apdu: bytes) -> AssociationResult:
    try:
        response = acse.ApplicationAssociationResponse.from_bytes(apdu)
    except Exception as exc:  # noqa: BLE001 - any parser failure is a bad frame
        raise AcseError(f"not an AARE: {exc}") from None
    accepted = response.result == enumerations.AssociationResult.ACCEPTED
    info = response.user_information.content if response.user_information else None
    max_pdu = info.server_max_receive_pdu_size if isinstance(info, InitiateResponse) else 0xFFFF
    diagnostic = getattr(response.result_source_diagnostics, "name", str(response.result_source_diagnostics)).lower()
    ciphered = None
    if isinstance(info, GlobalCipherInitiateResponse):
        ciphered = Ciphered(info.invocation_counter, bytes(info.ciphered_text))
    title = bytes(response.system_title) if response.system_title else None
    challenge = bytes(response.authentication_value) if response.authentication_value else None
    return AssociationResult(accepted, diagnostic, max_pdu, title, challenge, ciphered)


def rlrq() -> bytes:
    return bytes(acse.ReleaseRequest(reason=enumerations.ReleaseRequestReason.NORMAL).to_bytes())


def rlre() -> bytes:
    return bytes(acse.ReleaseResponse(reason=enumerations.ReleaseResponseReason.NORMAL).to_bytes())


RLRQ_TAG = 0x62
RLRE_TAG = 0x63
AARQ_TAG = 0x60
AARE_TAG = 0x61
