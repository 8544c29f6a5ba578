"""The switching and billing API over HTTP (ASGI), against the Modbus relay simulator."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from headend.api.app import create_app
from headend.api.auth import TokenStore
from headend.cli import main
from headend.config import parse_config
from headend.localservers import free_port
from headend.protocols.modbus import ModbusLink
from headend.protocols.modbus_maps import shipped_maps
from headend.registry import Registry
from headend.switching.engine import SwitchingEngine
from headend.switching.journal import CommandJournal
from headend.switching.policy import SwitchingPolicy
from headend.switching.runner import CommandRunner
from simulators.clock import ManualClock
from simulators.modbus_meter import ModbusSimulator, SimulatedMeter
from tests.test_switching import MONDAY_10

UNITS = {"C-1": 1, "C-2": 2, "H-1": 3}


@dataclass
class Api:
    app: FastAPI
    client: httpx.AsyncClient
    runner: CommandRunner
    sim: ModbusSimulator
    tokens: dict[str, str]

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    meter_map = shipped_maps()["sim-relay-meter"]
    sim = ModbusSimulator([SimulatedMeter(u, meter_map, ManualClock(MONDAY_10)) for u in UNITS.values()])
    port = free_port()
    await sim.start_tcp("127.0.0.1", port)
    link = ModbusLink.tcp("127.0.0.1", port, timeout=1)
    cfg = parse_config(
        {
            "links": [{"id": "bus", "kind": "tcp", "protocol": "modbus-tcp", "host": "127.0.0.1", "port": port}],
            "meters": [
                {"id": "C-1", "link": "bus", "address": 1, "map": "sim-relay-meter"},
                {"id": "C-2", "link": "bus", "address": 2, "map": "sim-relay-meter"},
                {"id": "H-1", "link": "bus", "address": 3, "map": "sim-relay-meter", "protected": True,
                 "protection": "water"},
            ],
        }
    )  # fmt: skip
    engine = SwitchingEngine(
        CommandJournal(tmp_path / "journal.sqlite"), SwitchingPolicy(cfg.switching), Registry(cfg),
        lambda m: link.session(m, UNITS[m], meter_map), confirm_timeout=0.5, poll_interval=0.05,
        now=lambda: MONDAY_10,
    )  # fmt: skip
    runner = CommandRunner(engine)
    await runner.start()
    token_file = tmp_path / "tokens.toml"
    tokens = {
        name: TokenStore.issue(token_file, name, frozenset(roles))
        for name, roles in {"anna": {"operator"}, "chief": {"operator", "override"}, "billing": {"billing"},
                            "auditor": {"read-only"}, "chief2": {"override"}}.items()
    }  # fmt: skip
    app = create_app(engine, runner, TokenStore.load(token_file))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://headend") as client:
        yield Api(app, client, runner, sim, tokens)
    await runner.stop()
    link.close()
    await sim.stop()


async def test_an_operator_disconnects_and_the_command_is_confirmed(api: Api) -> None:
    r = await api.client.post("/meters/C-1/commands", json={"action": "disconnect", "reason": "arrears #4711"},
                              headers=api.auth("anna"))  # fmt: skip
    assert r.status_code == 202 and r.headers["Location"] == f"/commands/{r.json()['id']}"
    await api.runner.join()
    got = (await api.client.get(r.headers["Location"], headers=api.auth("auditor"))).json()
    assert got["state"] == "confirmed" and got["who"] == "anna" and got["why"] == "arrears #4711"
    assert got["evidence"]["relay_after"] == "disconnected"
    assert [e["state"] for e in got["events"]] == ["requested", "queued", "running", "sent", "confirmed"]
    assert not api.sim.meters[1].relay_connected
    listed = (await api.client.get("/commands", params={"meter": "C-1", "state": "confirmed"},
                                   headers=api.auth("auditor"))).json()  # fmt: skip
    assert [c["id"] for c in listed["commands"]] == [got["id"]]


async def test_arrears_then_payment_reconnects_at_once(api: Api) -> None:
    arrears = {"type": "disconnect_for_arrears", "meter": "C-2", "reference": "INV-1"}
    off = await api.client.post("/billing/events", json=arrears, headers=api.auth("billing"))
    assert off.status_code == 202
    await api.runner.join()
    assert not api.sim.meters[2].relay_connected
    payment = {"type": "payment_received", "meter": "C-2", "reference": "PAY-9"}
    paid = await api.client.post("/billing/events", json=payment, headers=api.auth("billing"))
    assert paid.status_code == 202
    await api.runner.join()
    final = (await api.client.get(paid.headers["Location"], headers=api.auth("billing"))).json()
    assert final["state"] == "confirmed" and api.sim.meters[2].relay_connected
    again = await api.client.post("/billing/events", json=payment, headers=api.auth("billing"))
    assert again.json()["id"] == final["id"], "the same event twice is the same command"


async def test_a_protected_customer_needs_override_and_both_are_audited(api: Api) -> None:
    refused = await api.client.post("/meters/H-1/commands", json={"action": "disconnect", "reason": "arrears"},
                                    headers=api.auth("anna"))  # fmt: skip
    assert refused.status_code == 422 and refused.json()["state"] == "rejected"
    assert refused.json()["code"] == "protected" and "protected customer (water)" in refused.json()["detail"]
    role_only = await api.client.post("/meters/H-1/commands", json={"action": "disconnect", "reason": "arrears"},
                                      headers=api.auth("chief"))  # fmt: skip
    assert role_only.status_code == 422 and role_only.json()["code"] == "protected", "the role alone is not enough"
    no_role = await api.client.post("/meters/H-1/commands", headers=api.auth("anna"),
                                    json={"action": "disconnect", "reason": "arrears", "override": "court order"})
    assert no_role.status_code == 403 and no_role.json()["code"] == "override_forbidden"
    allowed = await api.client.post("/meters/H-1/commands", headers=api.auth("chief"),
                                    json={"action": "disconnect", "reason": "court order", "override": "order 12/26"})
    assert allowed.status_code == 202
    await api.runner.join()
    audit = (await api.client.get(allowed.headers["Location"], headers=api.auth("auditor"))).json()
    assert audit["state"] == "confirmed" and audit["override_reason"] == "order 12/26" and audit["who"] == "chief"
    rejected = (await api.client.get(f"/commands/{refused.json()['id']}", headers=api.auth("auditor"))).json()
    assert "protected customer (water)" in rejected["events"][-1]["reason"]


async def test_bulk_never_overrides_implicitly(api: Api) -> None:
    body = {"commands": [{"meter": m, "action": "disconnect", "reason": "arrears list 12/2026"}
                         for m in ("C-1", "H-1")]}  # fmt: skip
    r = await api.client.post("/commands/bulk", json=body, headers=api.auth("chief"))
    results = {x["meter"]: x for x in r.json()["results"]}
    assert results["C-1"]["status"] == 202 and results["H-1"]["status"] == 422
    assert results["H-1"]["code"] == "protected" and "override" in results["H-1"]["reason"]
    await api.runner.join()
    assert api.sim.meters[UNITS["H-1"]].relay_writes == 0 and api.sim.meters[UNITS["H-1"]].relay_connected


async def test_idempotency_keys_are_scoped_by_principal_meter_and_action(api: Api) -> None:
    def post(meter: str, who: str, reason: str = "arrears", action: str = "disconnect") -> Awaitable[httpx.Response]:
        return api.client.post(f"/meters/{meter}/commands", headers=api.auth(who),
                               json={"action": action, "reason": reason, "idempotency_key": "k-1"})  # fmt: skip

    first = await post("C-1", "anna")
    assert first.status_code == 202
    replay = await post("C-1", "anna")
    assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]
    other_meter = await post("C-2", "anna")
    assert other_meter.status_code == 202 and other_meter.json()["id"] != first.json()["id"]
    conflict = await post("C-1", "anna", reason="something else")
    assert conflict.status_code == 409 and conflict.json()["code"] == "idempotency_conflict"
    await api.runner.join()
    assert api.sim.meters[UNITS["C-1"]].relay_writes == 1 and api.sim.meters[UNITS["C-2"]].relay_writes == 1


async def test_billing_answers_409_or_422_for_what_it_did_not_accept(api: Api) -> None:
    arrears = {"type": "disconnect_for_arrears", "meter": "H-1", "reference": "INV-7"}
    r = await api.client.post("/billing/events", json=arrears, headers=api.auth("billing"))
    assert r.status_code == 422 and r.json()["code"] == "protected" and r.json()["state"] == "rejected"
    off = await api.client.post("/commands/bulk", headers=api.auth("anna"), json={"commands": [
        {"meter": "C-1", "action": "disconnect", "reason": "arrears"},
        {"meter": "C-1", "action": "disconnect", "reason": "arrears again"}]})  # fmt: skip
    assert [x["status"] for x in off.json()["results"]] == [202, 409]
    assert off.json()["results"][1]["code"] == "open_command"
    await api.runner.join()


async def test_listing_is_newest_first_with_cursor_paging_and_filters(api: Api) -> None:
    ids = []
    for n in range(5):
        r = await api.client.post("/meters/C-1/commands", headers=api.auth("anna"),
                                  json={"action": "disconnect" if n % 2 == 0 else "reconnect", "reason": f"step {n}"})
        ids.append(r.json()["id"])
        await api.runner.join()
    seen, cursor = [], None
    while True:
        params = {"meter": "C-1", "limit": 2, **({"before": cursor} if cursor else {})}
        page = (await api.client.get("/commands", params=params, headers=api.auth("auditor"))).json()
        seen += [c["id"] for c in page["commands"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    by_state = await api.client.get("/commands", params={"state": ["confirmed"], "principal": "anna"},
                                    headers=api.auth("auditor"))  # fmt: skip
    assert len(by_state.json()["commands"]) == 5
    assert (await api.client.get("/commands", params={"principal": "nobody"}, headers=api.auth("auditor"))).json()[
        "commands"] == []  # fmt: skip


async def test_bulk_gives_a_result_per_meter(api: Api) -> None:
    body = {"commands": [{"meter": "C-1", "action": "disconnect", "reason": "arrears"},
                         {"meter": "NOPE", "action": "disconnect", "reason": "arrears"}]}  # fmt: skip
    r = await api.client.post("/commands/bulk", json=body, headers=api.auth("anna"))
    assert [x["status"] for x in r.json()["results"]] == [202, 404]
    assert "no meter 'NOPE'" in r.json()["results"][1]["detail"]
    await api.runner.join()


@pytest.mark.parametrize(
    ("method", "path", "body", "who", "status", "reason"),
    [
        ("post", "/meters/C-1/commands", {"action": "disconnect", "reason": "x y z"}, None, 401, "missing bearer"),
        ("post", "/meters/C-1/commands", {"action": "disconnect", "reason": "x y z"}, "forged", 401, "unknown token"),
        ("post", "/meters/C-1/commands", {"action": "disconnect", "reason": "x y z"}, "auditor", 403, "operator"),
        ("post", "/meters/C-1/commands", {"action": "disconnect", "reason": "x y z"}, "billing", 403, "operator"),
        ("post", "/billing/events", {"type": "payment_received", "meter": "C-1", "reference": "r"}, "anna", 403,
         "billing"),
        ("post", "/meters/C-1/commands", {"action": "explode", "reason": "x y z"}, "anna", 422, "disconnect"),
        ("post", "/meters/C-1/commands", {"action": "disconnect", "reason": ""}, "anna", 422, "at least 3"),
        ("post", "/meters/C-1/commands", {"action": "disconnect", "reason": "ok!", "x": 1}, "anna", 422, "Extra"),
        ("post", "/meters/NOPE/commands", {"action": "disconnect", "reason": "x y z"}, "anna", 404, "no meter"),
        ("get", "/commands/doesnotexist", None, "auditor", 404, "no command"),
        ("get", "/commands?state=bogus", None, "auditor", 422, "requested"),
        ("get", "/commands?limit=5000", None, "auditor", 422, "less than or equal"),
    ],
)  # fmt: skip
async def test_bad_calls_get_a_4xx_with_a_reason(
    api: Api, method: str, path: str, body: dict[str, object] | None, who: str | None, status: int, reason: str
) -> None:
    headers = {} if who is None else ({"Authorization": "Bearer forged"} if who == "forged" else api.auth(who))
    r = await api.client.request(method, path, json=body, headers=headers)
    assert r.status_code == status
    assert reason in r.text


def test_tokens_are_stored_hashed(tmp_path: Path) -> None:
    token = TokenStore.issue(tmp_path / "t.toml", "anna", frozenset({"operator"}))
    text = (tmp_path / "t.toml").read_text()
    assert token not in text and "sha256" in text
    principal = TokenStore.load(tmp_path / "t.toml").authenticate(token)
    assert principal is not None and principal.roles == {"operator"}


async def test_the_switch_command_line_talks_to_the_api(
    api: Api, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(api.app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn offers no event to await its start
        await asyncio.sleep(0.01)
    monkeypatch.setenv("HEADEND_TOKEN", api.tokens["anna"])
    url = f"http://127.0.0.1:{port}"
    code = await asyncio.to_thread(main, ["switch", "disconnect", "C-1", "--reason", "arrears #4711", "--api", url])
    assert code == 0
    assert "disconnect C-1: confirmed" in capsys.readouterr().out
    assert await asyncio.to_thread(main, ["switch", "status", "C-1", "--api", url]) == 0
    status = capsys.readouterr().out
    assert "confirmed" in status and "newest first" in status
    assert await asyncio.to_thread(main, ["switch", "disconnect", "C-2", "--api", url]) == 2  # no reason given
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["switch", "disconnect", "H-1", "--reason", "arrears", "--api", url]) == 1
    err = capsys.readouterr().err
    assert "disconnect H-1 refused (protected): 422 protected customer (water)" in err
    monkeypatch.setenv("HEADEND_TOKEN", "wrong")
    assert await asyncio.to_thread(main, ["switch", "reconnect", "C-1", "--reason", "paid", "--api", url]) == 1
    assert "401" in capsys.readouterr().err
    server.should_exit = True
    await serving


async def test_two_person_rule_for_protected_customers(api: Api) -> None:
    policy = api.runner.engine.policy
    policy.config = policy.config.model_copy(update={"protected_approval": True})
    body = {"action": "disconnect", "reason": "court order", "override": "court order 12/26"}
    asked = await api.client.post("/meters/H-1/commands", json=body, headers=api.auth("chief"))
    assert asked.status_code == 202 and asked.json()["state"] == "awaiting_approval"
    approve = f"/commands/{asked.json()['id']}/approve"
    same = await api.client.post(approve, headers=api.auth("chief"))
    assert same.status_code == 403 and "different principal" in same.json()["detail"]
    operator = await api.client.post(approve, headers=api.auth("anna"))
    assert operator.status_code == 403
    await api.runner.join()
    assert api.sim.meters[UNITS["H-1"]].relay_writes == 0, "nothing happens before the second person approves"
    ok = await api.client.post(approve, headers=api.auth("chief2"))
    assert ok.status_code == 200 and ok.json()["approved_by"] == "chief2"
    await api.runner.join()
    done = (await api.client.get(asked.headers["Location"], headers=api.auth("auditor"))).json()
    assert done["state"] == "confirmed" and not api.sim.meters[UNITS["H-1"]].relay_connected
    assert [e["state"] for e in done["events"]][:3] == ["requested", "awaiting_approval", "queued"]
    assert done["events"][2]["approved_by"] == "chief2"
    again = await api.client.post(approve, headers=api.auth("chief2"))
    assert again.status_code == 409


async def test_two_person_rule_holds_outside_the_window_too(api: Api) -> None:
    """Requested at night: the approval comes first; the window opening later never stands in for it."""
    engine = api.runner.engine
    engine.policy.config = engine.policy.config.model_copy(update={"protected_approval": True})
    engine.now = lambda: MONDAY_10.replace(hour=20)
    body = {"action": "disconnect", "reason": "court order", "override": "court order 12/26"}
    asked = await api.client.post("/meters/H-1/commands", json=body, headers=api.auth("chief"))
    assert asked.json()["state"] == "awaiting_approval"
    engine.now = lambda: MONDAY_10 + timedelta(days=1)  # Tuesday 10:00: the window is open
    api.runner.clock_changed()
    await api.runner.join()
    assert (await api.client.get(asked.headers["Location"], headers=api.auth("auditor"))).json()["state"] == (
        "awaiting_approval")  # fmt: skip
    assert api.sim.meters[UNITS["H-1"]].relay_writes == 0


@pytest.mark.parametrize("body", [
    '{"action": "disconnect", "reason": "arr\\ud800ears"}',
    '{"action": "disconnect", "reason": "arrears", "idempotency_key": "\\udfff"}',
    '{"action": "disconnect", "reason": "arrears", "override": "x\\ud800y"}',
])  # fmt: skip
async def test_text_that_is_not_unicode_gets_a_422_not_a_500(api: Api, body: str) -> None:
    r = await api.client.post("/meters/C-1/commands", content=body,
                              headers={**api.auth("chief"), "content-type": "application/json"})  # fmt: skip
    assert r.status_code == 422 and "valid Unicode" in r.text


async def test_a_slow_journal_disk_never_holds_up_the_event_loop(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every admission is an fsynced transaction; on a slow or busy disk that takes long. It
    runs in the journal's thread: while a bulk waits for the disk, the server answers."""
    journal = api.runner.engine.journal
    entered, disk = threading.Event(), threading.Event()
    create = journal.create

    def slow_create(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        assert disk.wait(30), "the test never let the disk go on"
        return create(*args, **kwargs)

    monkeypatch.setattr(journal, "create", slow_create)
    bulk = asyncio.create_task(api.client.post("/commands/bulk", headers=api.auth("anna"), json={"commands": [
        {"meter": m, "action": "disconnect", "reason": "arrears run"} for m in ("C-1", "C-2")]}))  # fmt: skip
    assert await asyncio.to_thread(entered.wait, 30)
    assert (await api.client.get("/health")).status_code == 200  # the disk is still "writing"
    assert not bulk.done()
    disk.set()
    assert [r["status"] for r in (await bulk).json()["results"]] == [202, 202]
