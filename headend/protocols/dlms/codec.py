"""The one module that imports dlms-cosem: ACSE (AARQ / AARE / RLRQ / RLRE) encoding.

Everything else in the DLMS driver goes through here, so the library (BSL 1.1 licensed,
see the package docstring) can be replaced in one place. Its structlog output is switched
off: logging every APDU costs several times the throughput.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import structlog
from dlms_cosem import enumerations
from dlms_cosem.protocol import acse
from dlms_cosem.protocol.xdlms import Conformance, InitiateRequest, InitiateResponse

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))

AUTH_NONE = "none"
AUTH_LLS = "lls"

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
class AssociationRequest:
    authentication: str
    password: bytes | None
    max_pdu: int


@dataclass(frozen=True)
class AssociationResult:
    accepted: bool
    diagnostic: str
    max_pdu: int


def aarq(authentication: str = AUTH_NONE, password: bytes | None = None, max_pdu: int = 0xFFFF) -> bytes:
    mechanism = enumerations.AuthenticationMechanism.LLS if authentication == AUTH_LLS else None
    request = acse.ApplicationAssociationRequest(
        ciphered=False,
        system_title=None,
        authentication=mechanism,
        authentication_value=password if authentication == AUTH_LLS else None,
        user_information=acse.UserInformation(
            content=InitiateRequest(proposed_conformance=CONFORMANCE, client_max_receive_pdu_size=max_pdu)
        ),
    )
    return bytes(request.to_bytes())


def parse_aarq(apdu: bytes) -> AssociationRequest:
    try:
        request = acse.ApplicationAssociationRequest.from_bytes(apdu)
    except Exception as exc:  # noqa: BLE001 - any parser failure is a bad frame
        raise AcseError(f"not an AARQ: {exc}") from None
    info = request.user_information.content if request.user_information else None
    max_pdu = info.client_max_receive_pdu_size if isinstance(info, InitiateRequest) else 0xFFFF
    auth = AUTH_LLS if request.authentication == enumerations.AuthenticationMechanism.LLS else AUTH_NONE
    value = bytes(request.authentication_value) if request.authentication_value else None
    return AssociationRequest(auth, value, max_pdu)


def aare(accepted: bool, *, authentication: str = AUTH_NONE, failure: str = "authentication_failed",
         max_pdu: int = 0xFFFF) -> bytes:  # fmt: skip
    diagnostic = (
        enumerations.AcseServiceUserDiagnostics.NULL
        if accepted
        else enumerations.AcseServiceUserDiagnostics[failure.upper()]
    )
    response = acse.ApplicationAssociationResponse(
        result=enumerations.AssociationResult.ACCEPTED
        if accepted
        else enumerations.AssociationResult.REJECTED_PERMANENT,
        result_source_diagnostics=diagnostic,
        authentication=enumerations.AuthenticationMechanism.LLS if authentication == AUTH_LLS else None,
        user_information=acse.UserInformation(
            content=InitiateResponse(negotiated_conformance=CONFORMANCE, server_max_receive_pdu_size=max_pdu)
        )
        if accepted
        else None,
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
    return AssociationResult(accepted, diagnostic, max_pdu)


def rlrq() -> bytes:
    return bytes(acse.ReleaseRequest(reason=enumerations.ReleaseRequestReason.NORMAL).to_bytes())


def rlre() -> bytes:
    return bytes(acse.ReleaseResponse(reason=enumerations.ReleaseResponseReason.NORMAL).to_bytes())


RLRQ_TAG = 0x62
RLRE_TAG = 0x63
AARQ_TAG = 0x60
AARE_TAG = 0x61
