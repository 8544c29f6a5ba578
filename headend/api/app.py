"""The HTTP API: switching commands and billing events, bearer-token authenticated.

Every call here needs `Authorization: Bearer <token>`; roles decide what it may do. (Of
what `headend serve` adds, `/health` and the docs pages are open, and `/metrics` unless
`api.metrics_auth` is set.) Bad input gets a 4xx with a reason (422 lists the fields),
never a 500.
"""

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field

from headend.api.auth import Principal, TokenStore
from headend.api.security import authenticated, require_roles
from headend.model import RelayAction
from headend.registry import UnknownMeter
from headend.switching.engine import ApprovalError, SwitchingEngine
from headend.switching.journal import Admitted, Command, CommandState, IdempotencyConflict, JournalError
from headend.switching.policy import Refusal
from headend.switching.runner import CommandRunner


def _utf8(text: str) -> str:
    # JSON may carry lone surrogates ("\ud800"); they are not text and cannot be journaled.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]
Reason = Annotated[Text, Field(min_length=3, max_length=500)]
Key = Annotated[Text, Field(min_length=1, max_length=100)]
MeterId = Annotated[Text, Field(min_length=1, max_length=200)]
#: HTTP status of a request the head-end did not accept, by refusal code (else 422).
_REFUSAL_STATUS = {Refusal.OVERRIDE_FORBIDDEN: 403, Refusal.OPEN_COMMAND: 409}


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CommandIn(Body):
    action: Literal["disconnect", "reconnect"]
    reason: Reason
    idempotency_key: Key | None = None
    #: Disconnect a protected customer: the reason for overriding (needs the override role too).
    override: Reason | None = None
    #: Outside a disconnect window: wait for the next one (true) or refuse at once (false).
    defer: bool = True


class BulkItem(CommandIn):
    meter: MeterId


class BulkIn(Body):
    commands: list[BulkItem] = Field(min_length=1, max_length=1000)


class BillingEvent(Body):
    type: Literal["disconnect_for_arrears", "payment_received"]
    meter: MeterId
    reference: Key


def _iso(ns: int | None) -> str | None:
    return None if ns is None else datetime.fromtimestamp(ns / 1e9).astimezone().isoformat()


def command_json(command: Command, events: list[Any] | None = None) -> dict[str, Any]:
    out = {
        "id": command.id,
        "meter": command.meter,
        "action": command.action.value,
        "state": command.state.value,
        "code": command.reason_code or None,
        "reason": command.reason or None,
        "who": command.who,
        "why": command.why,
        "override": command.override,
        "override_reason": command.override_reason,
        "approved_by": command.approved_by,
        "attempts": command.attempts,
        "created": _iso(command.created_ns),
        "updated": _iso(command.updated_ns),
        "not_before": _iso(command.not_before_ns),
        "expires": _iso(command.expires_ns),
        "evidence": command.evidence,
        "href": f"/commands/{command.id}",
    }
    if events is not None:
        out["events"] = [{"state": e.state.value, "at_ns": e.at_ns, **e.detail} for e in events]
    return out


def admitted_status(admitted: Admitted) -> int:
    """202 for a new command the head-end took on; 200 for a replayed idempotency key; the
    refusal's own 4xx for a command it did not accept (never 202)."""
    command = admitted.command
    if command.state == CommandState.REJECTED:
        return _REFUSAL_STATUS.get(command.reason_code, 422)  # type: ignore[call-overload]
    return 202 if admitted.new else 200


async def invalid_request(_request: Request, exc: Exception) -> Response:
    """422 listing what is wrong, without echoing the input: an echo of text that is not
    valid Unicode (a lone surrogate) cannot be encoded, and a huge input need not come back."""
    assert isinstance(exc, RequestValidationError)
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]
    body = json.dumps({"detail": errors}, ensure_ascii=True)
    return Response(body, status_code=422, media_type="application/json")


def create_app(engine: SwitchingEngine, runner: CommandRunner, tokens: TokenStore) -> FastAPI:
    app = FastAPI(title="headend", version="0.1.0")
    app.add_exception_handler(RequestValidationError, invalid_request)
    Operator = Annotated[Principal, Depends(require_roles(tokens, "operator", "override"))]
    Overrider = Annotated[Principal, Depends(require_roles(tokens, "override"))]
    Billing = Annotated[Principal, Depends(require_roles(tokens, "billing"))]
    Reader = Annotated[Principal, Depends(authenticated(tokens))]

    async def submit(meter: str, action: str, who: Principal, why: str, key: str | None, override: str | None = None,
                     defer: bool = True) -> tuple[int, dict[str, Any]]:  # fmt: skip
        """The one admission path of every switching request: (HTTP status, body). Journaled
        (fsynced) in the engine's journal thread, taken on by the runner here on the loop."""
        try:
            admitted = await engine.off_loop(engine.request, meter, RelayAction(action), who=who.name, why=why,
                                             roles=who.roles, idempotency_key=key, override_reason=override,
                                             defer=defer)  # fmt: skip
        except UnknownMeter as exc:
            return 404, {"meter": meter, "code": "unknown_meter", "detail": str(exc)}
        except IdempotencyConflict as exc:
            return 409, {"code": "idempotency_conflict", "detail": str(exc), "command": command_json(exc.command)}
        if admitted.new:
            runner.submit(admitted.command)
        body = command_json(admitted.command)
        body["cancelled"] = [c.id for c in admitted.cancelled]
        if admitted.command.state == CommandState.REJECTED:
            body["detail"] = admitted.command.reason
        return admitted_status(admitted), body

    def answer(code: int, body: dict[str, Any]) -> JSONResponse:
        headers = {"Location": body["href"]} if "href" in body else {}
        return JSONResponse(body, status_code=code, headers=headers)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/meters/{meter_id}/commands", status_code=202)
    async def create_command(meter_id: str, body: CommandIn, who: Operator) -> JSONResponse:
        """202: taken on (queued, deferred or awaiting approval); 200: the same idempotency key
        again; 403/409/422 with `code` and `detail`: not accepted."""
        return answer(*await submit(meter_id, body.action, who, body.reason, body.idempotency_key, body.override,
                                    body.defer))  # fmt: skip

    @app.post("/commands/bulk")
    async def bulk(body: BulkIn, who: Operator) -> dict[str, Any]:
        """One result per item, each with its own HTTP status, code and reason."""
        results = []
        for item in body.commands:
            # One admission at a time: a reconnect asked meanwhile waits for one, not for all.
            code, out = await submit(item.meter, item.action, who, item.reason, item.idempotency_key, item.override,
                                     item.defer)  # fmt: skip
            results.append({**out, "meter": item.meter, "status": code})
        return {"results": results}

    @app.post("/commands/{command_id}/approve")
    async def approve(command_id: str, who: Overrider) -> JSONResponse:
        """Two-person rule: a different principal with the override role lets a protected
        customer's disconnect go ahead (it still waits for a window)."""
        try:
            command = await engine.off_loop(engine.approve, command_id, who.name, who.roles)
        except JournalError:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no command {command_id}") from None
        except ApprovalError as exc:
            raise HTTPException(exc.status, str(exc)) from None
        runner.submit(command)
        code = admitted_status(Admitted(command, True))
        return answer(code if code != 202 else 200, command_json(command))

    @app.get("/commands/{command_id}")
    async def get_command(command_id: str, _who: Reader) -> dict[str, Any]:
        try:
            command = await engine.off_loop(engine.journal.get, command_id)
        except JournalError:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no command {command_id}") from None
        return command_json(command, await engine.off_loop(engine.journal.events, command_id))

    @app.get("/commands")
    async def list_commands(
        _who: Reader,
        meter: str | None = None,
        state: Annotated[list[CommandState] | None, Query()] = None,
        since: AwareDatetime | None = None,
        principal: str | None = None,
        before: Annotated[str | None, Query(pattern=r"^[0-9]{1,20}:[0-9a-f]{1,64}$")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        """Newest first. `next` is the cursor for the following (older) page: pass it as `before`."""
        since_ns = None if since is None else int(since.timestamp() * 1e9)
        page = await engine.off_loop(engine.journal.page, meter=meter, states=state or (), who=principal,
                                     before=before, limit=limit, since_ns=since_ns)  # fmt: skip
        return {"commands": [command_json(c) for c in page.commands], "next": page.next_cursor}

    @app.post("/billing/events", status_code=202)
    async def billing_event(body: BillingEvent, who: Billing) -> JSONResponse:
        """An arrears disconnect (policy applies; deferred to the next window if need be) or a
        payment (reconnect at once; it cancels a disconnect not yet sent). 202 only for what
        was taken on; the reference, per meter and type, is the idempotency key."""
        action = "disconnect" if body.type == "disconnect_for_arrears" else "reconnect"
        return answer(*await submit(body.meter, action, who, f"{body.type} {body.reference}",
                                    f"billing:{body.type}:{body.reference}"))  # fmt: skip

    return app
