"""MQTT command integrity against a rogue client on the broker (issue #14): an answer counts
only from the commanded concentrator's own topic, for the commanded meter and command; a
contradicting second answer to a relay command is not believed; and with the shipped
mosquitto ACL a rogue cannot even read the commands."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from headend.config import MqttLink, parse_config
from headend.localservers import MosquittoServer
from headend.model import RelayAction, RelayState
from headend.protocols.base import LinkDown
from headend.protocols.mqtt import ConcentratorLink
from headend.protocols.mqtt_schema import Command, Response
from headend.registry import Registry
from headend.storage.outbox import Outbox
from headend.switching.engine import SwitchingEngine
from headend.switching.journal import CommandJournal, CommandState
from headend.switching.policy import SwitchingPolicy
from simulators.clock import Clock
from simulators.mqtt_concentrator import SimulatedConcentrator

ACL = Path(__file__).resolve().parent.parent / "config" / "mosquitto" / "acl"


@contextlib.asynccontextmanager
async def rogue(port: int, answer: Callable[[str, Command], list[tuple[str, Response]]], *,
                username: str | None = None, password: str | None = None) -> AsyncIterator[list[str]]:
    """A client that reads every command it can and answers them as `answer` says; yields the
    topics of the commands it saw."""
    seen: list[str] = []
    async with aiomqtt.Client("127.0.0.1", port, identifier=f"rogue-{uuid.uuid4().hex[:6]}", username=username,
                              password=password) as client:  # fmt: skip
        await client.subscribe("headend/v1/dc/+/cmd/#", qos=1)

        async def serve() -> None:
            async for message in client.messages:
                seen.append(str(message.topic))
                command = Command.model_validate_json(message.payload)  # type: ignore[arg-type]
                for topic, response in answer(str(message.topic).rsplit("/", 1)[-1], command):
                    await client.publish(topic, response.model_dump_json(), qos=1)

        task = asyncio.create_task(serve())
        try:
            yield seen
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def forged(state: RelayState, *topics: str) -> Callable[[str, Command], list[tuple[str, Response]]]:
    """Answers every relay command with `state`, on the command's reply topic and on `topics`."""

    def answer(name: str, command: Command) -> list[tuple[str, Response]]:
        if name not in ("relay", "relay_state"):
            return []
        response = Response(correlation_id=command.correlation_id, meter=command.meter, command=name, status="ok",
                            result={"state": state.value})  # fmt: skip
        return [(topic, response) for topic in (command.reply_to, *topics)]

    return answer


@contextlib.asynccontextmanager
async def site(tmp_path: Path, port: int, *, link_auth: dict[str, Any] | None = None,
               dc_auth: dict[str, Any] | None = None) -> AsyncIterator[tuple[SwitchingEngine, ConcentratorLink,
                                                                             SimulatedConcentrator]]:  # fmt: skip
    cid = f"dc-{uuid.uuid4().hex[:8]}"
    dc = SimulatedConcentrator(cid, "127.0.0.1", port, ["Q1"], Clock(), **(dc_auth or {}))
    dc.loads["Q1"].set_relay(False, dc.clock.now())  # cut off earlier
    cfg = parse_config({"links": [{"id": "broker", "kind": "mqtt", "host": "127.0.0.1", "port": port}],
                        "concentrators": [{"id": cid, "link": "broker"}],
                        "meters": [{"id": "Q1", "concentrator": cid}]})  # fmt: skip
    outbox = Outbox(tmp_path / "outbox.sqlite")
    async with ConcentratorLink("127.0.0.1", port, outbox, headend_id=f"he-{cid}", command_timeout=3,
                                **(link_auth or {})) as link:  # fmt: skip
        await link.connected.wait()
        await dc.start()
        await link.until(lambda: cid in link.concentrators and link.concentrators[cid].online)
        engine = SwitchingEngine(CommandJournal(tmp_path / "journal.sqlite"), SwitchingPolicy(cfg.switching),
                                 Registry(cfg), lambda m: link.session(m, cid), confirm_timeout=1,
                                 poll_interval=0.1, attempts=2)  # fmt: skip
        try:
            yield engine, link, dc
        finally:
            await dc.stop()
            engine.journal.close()
    outbox.close()


async def test_forged_relay_answers_never_confirm_a_reconnect(
    tmp_path: Path, mosquitto_server: MosquittoServer
) -> None:
    """No ACL: a rogue reads the commands and answers 'connected' before the concentrator,
    whose relay is stuck open. The reconnect must not be confirmed (the customer is dark)."""
    async with site(tmp_path, mosquitto_server.port) as (engine, link, dc):
        dc.faults.stuck_relays.add("Q1")
        old_topic = f"headend/v1/he/{link.headend_id}/resp"  # where the first wave's answers went
        async with rogue(mosquitto_server.port, forged(RelayState.CONNECTED, old_topic)) as seen:
            command = await engine.execute("Q1", RelayAction.RECONNECT, who="billing", why="paid")
        assert seen, "the rogue did see the commands (no ACL)"
        assert command.state == CommandState.FAILED and not dc.loads["Q1"].relay_connected
        assert "contradicting answers" in command.reason
        assert link.stats.refused_answers >= 1


async def test_answers_on_another_concentrators_topic_are_refused(
    tmp_path: Path, mosquitto_server: MosquittoServer
) -> None:
    async with site(tmp_path, mosquitto_server.port) as (engine, link, dc):

        def elsewhere(name: str, command: Command) -> list[tuple[str, Response]]:
            answers = forged(RelayState.DISCONNECTED)(name, command)
            return [("headend/v1/dc/dc-rogue/resp", response) for _topic, response in answers]

        async with rogue(mosquitto_server.port, elsewhere):
            command = await engine.execute("Q1", RelayAction.RECONNECT, who="billing", why="paid")
        assert command.state == CommandState.CONFIRMED and dc.loads["Q1"].relay_connected
        assert command.evidence["relay_after"] == "connected"
        assert link.stats.refused_answers >= 1


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[MosquittoServer]:
    users = {"headend": "he-secret", "dc-acl": "dc-secret", "dc-rogue": "rogue-secret"}
    server = MosquittoServer(tmp_path / "broker", acl_file=ACL, users=users)
    server.start()
    yield server
    server.stop()


async def test_with_the_shipped_acl_a_rogue_cannot_read_or_answer_commands(
    tmp_path: Path, acl_broker: MosquittoServer
) -> None:
    port = acl_broker.port
    dc = SimulatedConcentrator("dc-acl", "127.0.0.1", port, ["Q1"], Clock(), username="dc-acl",
                               password="dc-secret")  # fmt: skip
    dc.loads["Q1"].set_relay(False, dc.clock.now())
    cfg = parse_config({"links": [{"id": "broker", "kind": "mqtt", "host": "127.0.0.1", "port": port}],
                        "concentrators": [{"id": "dc-acl", "link": "broker"}],
                        "meters": [{"id": "Q1", "concentrator": "dc-acl"}]})  # fmt: skip
    outbox = Outbox(tmp_path / "outbox.sqlite")
    async with ConcentratorLink("127.0.0.1", port, outbox, username="headend", password="he-secret",
                                command_timeout=3) as link:  # fmt: skip
        await link.connected.wait()
        await dc.start()
        await link.until(lambda: "dc-acl" in link.concentrators and link.concentrators["dc-acl"].online)
        engine = SwitchingEngine(CommandJournal(tmp_path / "journal.sqlite"), SwitchingPolicy(cfg.switching),
                                 Registry(cfg), lambda m: link.session(m, "dc-acl"), confirm_timeout=1,
                                 poll_interval=0.1)  # fmt: skip
        try:
            async with rogue(port, forged(RelayState.CONNECTED, "headend/v1/dc/dc-acl/resp"), username="dc-rogue",
                             password="rogue-secret") as seen:  # fmt: skip
                dc.faults.stuck_relays.add("Q1")
                stuck = await engine.execute("Q1", RelayAction.RECONNECT, who="billing", why="paid")
                dc.faults.stuck_relays.clear()
                done = await engine.execute("Q1", RelayAction.RECONNECT, who="billing", why="paid again")
            assert seen == [], "the ACL keeps the commands (and their correlation ids) from the rogue"
            for identifier in ("dc-dc-acl", "dc-acl", link.client_id):  # try to take over client ids
                async with aiomqtt.Client("127.0.0.1", port, identifier=identifier, username="dc-rogue",
                                          password="rogue-secret"):  # fmt: skip
                    pass
            assert link.concentrators["dc-acl"].online and link.connected.is_set(), "nobody was pushed off"
            again = await engine.execute("Q1", RelayAction.RECONNECT, who="billing", why="paid, checked again")
            assert again.state == CommandState.CONFIRMED, "the concentrator still answers its head-end"
            assert stuck.state == CommandState.FAILED and "relay still disconnected" in stuck.reason
            assert done.state == CommandState.CONFIRMED and dc.loads["Q1"].relay_connected
            assert link.stats.refused_answers == 0, "forged answers never even reach the head-end"
        finally:
            await dc.stop()
            engine.journal.close()
    outbox.close()


async def test_with_answer_keys_a_forger_cannot_beat_a_slow_concentrator(
    tmp_path: Path, mosquitto_server: MosquittoServer
) -> None:
    """No ACL, a concentrator that takes a second to answer, a rogue answering at once: the
    grace alone would believe the rogue; signed answers do not."""
    key = bytes(range(32))
    async with site(tmp_path, mosquitto_server.port, link_auth={"answer_keys": {}},
                    dc_auth={"answer_key": key}) as (engine, link, dc):  # fmt: skip
        link.answer_keys = {dc.id: key}
        dc.faults.stuck_relays.add("Q1")
        dc.faults.answer_delay = 1.0
        async with rogue(mosquitto_server.port, forged(RelayState.CONNECTED)) as seen:
            command = await engine.execute("Q1", RelayAction.RECONNECT, who="billing", why="paid")
        assert seen and command.state == CommandState.FAILED and not dc.loads["Q1"].relay_connected
        assert "relay still disconnected" in command.reason, "decided on the concentrator's own answers"
        assert link.stats.refused_answers >= 1
        dc.faults.stuck_relays.clear()
        done = await engine.execute("Q1", RelayAction.RECONNECT, who="billing", why="paid, again")
        assert done.state == CommandState.CONFIRMED and dc.loads["Q1"].relay_connected


async def test_a_forged_answer_with_a_mac_in_non_ascii_text_never_stops_the_link(
    tmp_path: Path, mosquitto_server: MosquittoServer
) -> None:
    """Such a MAC once raised inside the comparison and restarted the link at every answer,
    failing every command in flight; now the answer is refused as malformed (quarantined)."""
    key = bytes(range(32))

    def non_ascii_mac(name: str, command: Command) -> list[tuple[str, Response]]:
        if name not in ("relay", "relay_state"):
            return []
        response = Response.model_construct(correlation_id=command.correlation_id, meter=command.meter, command=name,
                                            status="ok", error=None, message=None,
                                            result={"state": RelayState.CONNECTED.value}, mac="é" * 64)  # fmt: skip
        return [(command.reply_to, response)]

    async with site(tmp_path, mosquitto_server.port, link_auth={"answer_keys": {}},
                    dc_auth={"answer_key": key}) as (engine, link, dc):  # fmt: skip
        link.answer_keys = {dc.id: key}
        dc.faults.answer_delay = 0.3
        connects = link.stats.connects
        async with rogue(mosquitto_server.port, non_ascii_mac) as seen:
            command = await engine.execute("Q1", RelayAction.RECONNECT, who="billing", why="paid")
        assert seen and command.state == CommandState.CONFIRMED and dc.loads["Q1"].relay_connected
        assert link.stats.connects == connects, "the link never dropped"
        assert link.stats.bad_messages >= 1


def test_an_answer_key_from_the_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = parse_config({"links": [{"id": "broker", "kind": "mqtt", "host": "127.0.0.1", "port": 1}],
                        "concentrators": [{"id": "dc-k", "link": "broker", "answer_key_env": "DC_K"}],
                        "meters": [{"id": "Q1", "concentrator": "dc-k"}]})  # fmt: skip
    outbox = Outbox(tmp_path / "outbox.sqlite")
    link_cfg = cfg.links[0]
    assert isinstance(link_cfg, MqttLink)
    with pytest.raises(LinkDown, match="DC_K is not set"):
        ConcentratorLink.from_config(link_cfg, outbox, cfg, env={})
    with pytest.raises(LinkDown, match="16 bytes or more"):
        ConcentratorLink.from_config(link_cfg, outbox, cfg, env={"DC_K": "abcd"})
    link = ConcentratorLink.from_config(link_cfg, outbox, cfg, env={"DC_K": "00" * 32})
    assert link.answer_keys == {"dc-k": bytes(32)}
    outbox.close()
