"""The HTTP API: switching commands and billing events, bearer-token authenticated.

Every call needs `Authorization: Bearer <token>`; roles decide what it may do. Bad input
gets a 4xx with a reason (422 lists the fields), never a 500.
"""

from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, status
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from headend.api.auth import Principal, TokenStore
from headend.api.security import authenticated, require_roles
from headend.model import RelayAction
from headend.registry import UnknownMeter
from headend.switching.engine import SwitchingEngine
from headend.switching.journal import Command, CommandState, JournalError
from headend.switching.runner import CommandRunner

Reason = Annotated[str, Field(min_length=3, max_length=500)]
Key = Annotated[str, Field(min_length=1, max_length=100)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CommandIn(Body):
    action: Literal["disconnect", "reconnect"]
    reason: Reason
    idempotency_key: Key | None = None


class BulkItem(CommandIn):
    meter: str


class BulkIn(Body):
    commands: list[BulkItem] = Field(min_length=1, max_length=1000)


class BillingEvent(Body):
    type: Literal["disconnect_for_arrears", "payment_received"]
    meter: str
    reference: Key


def command_json(command: Command, events: list[Any] | None = None) -> dict[str, Any]:
    out = {
        "id": command.id,
        "meter": command.meter,
        "action": command.action.value,
        "state": command.state.value,
        "who": command.who,
        "why": command.why,
        "override": command.override,
        "attempts": command.attempts,
        "evidence": command.evidence,
        "href": f"/commands/{command.id}",
    }
    if events is not None:
        out["events"] = [{"state": e.state.value, "at_ns": e.at_ns, **e.detail} for e in events]
    return out


def create_app(engine: SwitchingEngine, runner: CommandRunner, tokens: TokenStore) -> FastAPI:
    app = FastAPI(title="headend", version="0.1.0")
    Operator = Annotated[Principal, Depends(require_roles(tokens, "operator", "override"))]
    Billing = Annotated[Principal, Depends(require_roles(tokens, "billing"))]
    Reader = Annotated[Principal, Depends(authenticated(tokens))]

    def submit(meter: str, action: str, who: Principal, why: str, key: str | None) -> Command:
        try:
            command = engine.request(meter, RelayAction(action), who=who.name, why=why, roles=who.roles,
                                     idempotency_key=key)  # fmt: skip
        except UnknownMeter as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        runner.submit(command)
        return command

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/meters/{meter_id}/commands", status_code=202)
    async def create_command(meter_id: str, body: CommandIn, who: Operator) -> JSONResponse:
        command = submit(meter_id, body.action, who, body.reason, body.idempotency_key)
        return JSONResponse(command_json(command), status_code=202, headers={"Location": f"/commands/{command.id}"})

    @app.post("/commands/bulk")
    async def bulk(body: BulkIn, who: Operator) -> dict[str, Any]:
        results = []
        for item in body.commands:
            try:
                command = submit(item.meter, item.action, who, item.reason, item.idempotency_key)
                results.append({"meter": item.meter, "status": 202, **command_json(command)})
            except HTTPException as exc:
                results.append({"meter": item.meter, "status": exc.status_code, "error": exc.detail})
        return {"results": results}

    @app.get("/commands/{command_id}")
    async def get_command(command_id: str, _who: Reader) -> dict[str, Any]:
        try:
            command = engine.journal.get(command_id)
        except JournalError:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no command {command_id}") from None
        return command_json(command, engine.journal.events(command_id))

    @app.get("/commands")
    async def list_commands(
        _who: Reader,
        meter: str | None = None,
        state: CommandState | None = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        return {"commands": [command_json(c) for c in engine.journal.find(meter, state, limit)]}

    @app.post("/billing/events", status_code=202)
    async def billing_event(body: BillingEvent, who: Billing) -> JSONResponse:
        action = "disconnect" if body.type == "disconnect_for_arrears" else "reconnect"
        command = submit(
            body.meter, action, who, f"{body.type} {body.reference}", f"billing:{body.type}:{body.reference}"
        )
        return JSONResponse(command_json(command), status_code=202, headers={"Location": f"/commands/{command.id}"})

    return app
