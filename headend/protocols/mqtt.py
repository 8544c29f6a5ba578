"""Concentrator link over MQTT (aiomqtt on paho-mqtt): reads in, commands out.

- QoS 1 on a persistent session (MQTT 5 clean_start=False with a session expiry; v3.1.1
  clean_session=False when the broker does not speak 5). A data message is acknowledged to
  the broker only after its readings are committed to the outbox (paho's manual acks): a
  crash between receive and commit makes the broker deliver it again.
- Data messages carry a per-concentrator `seq`. Duplicates and out-of-order messages are
  harmless (storage is idempotent, gaps are filled by late arrivals); a gap still open after
  `gap_grace` seconds triggers a `backfill` command for the missing seq range. The
  contiguous watermark and the highest seq are committed with the readings, so a restart
  resumes gap detection where it left off.
- Concentrator online/offline comes from retained birth/death (Last Will) state messages;
  a death older than the current birth (bdseq) is ignored.
- Commands go out with MQTT 5 response topic + correlation data (and the same in the
  payload for v3.1.1), and are answered on this head-end's response topic.
- Broker gone: reconnect with exponential backoff and jitter, forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import ssl
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from headend.config import Config, MqttLink
from headend.model import InvalidReading, Obis, Reading, ReadingKind, RelayAction, RelayState, event_readings
from headend.protocols.base import BadFrame, LinkDown, MeterError, Refused, Timeout, Unsupported
from headend.protocols.mqtt_schema import (
    DATA_FILTER,
    STATE_FILTER,
    Block,
    Command,
    Data,
    InventoryMeter,
    Point,
    Response,
    State,
    command_topic,
    concentrator_of,
    response_topic,
)
from headend.storage.outbox import Outbox

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 86_400
_ERRORS: dict[str, type[MeterError]] = {
    "unknown_meter": Refused,
    "refused": Refused,
    "bad_request": Refused,
    "meter_timeout": Timeout,
    "unsupported": Unsupported,
}


@dataclass
class ConcentratorState:
    id: str
    online: bool = False
    bdseq: int = -1
    firmware: str | None = None
    meters: dict[str, InventoryMeter] = field(default_factory=dict)
    #: All seqs <= watermark have been received; `highest` is the largest seen.
    watermark: int = -1
    highest: int = -1
    received_above: set[int] = field(default_factory=set)
    #: Missing seq -> monotonic time it was first noticed; requested ones are not asked again.
    missing_since: dict[int, float] = field(default_factory=dict)
    requested: set[int] = field(default_factory=set)

    def note(self, seq: int, now: float) -> bool:
        """Record a data seq; return False if it was already received."""
        if seq <= self.watermark or seq in self.received_above:
            return False
        for gap in range(max(self.highest, self.watermark) + 1, seq):
            self.missing_since.setdefault(gap, now)
        self.highest = max(self.highest, seq)
        self.received_above.add(seq)
        self.missing_since.pop(seq, None)
        self.requested.discard(seq)
        while self.watermark + 1 in self.received_above:
            self.watermark += 1
            self.received_above.discard(self.watermark)
        return True

    def overdue(self, now: float, grace: float) -> list[tuple[int, int]]:
        """Missing seq ranges older than `grace` not yet asked for, as (first, last)."""
        due = sorted(s for s, t in self.missing_since.items() if now - t >= grace and s not in self.requested)
        ranges: list[tuple[int, int]] = []
        for s in due:
            if ranges and ranges[-1][1] == s - 1:
                ranges[-1] = (ranges[-1][0], s)
            else:
                ranges.append((s, s))
        return ranges


@dataclass
class LinkStats:
    received: int = 0
    accepted_readings: int = 0
    duplicates: int = 0
    bad_messages: int = 0
    gaps: int = 0
    backfills: int = 0
    connects: int = 0


def _cursor_keys(concentrator: str) -> tuple[str, str]:
    return f"mqtt:{concentrator}:watermark", f"mqtt:{concentrator}:highest"


def point_reading(
    meter: str, channel: Obis, kind: ReadingKind, unit: str, p: Point, multiplier: float, source: str
) -> Reading:
    return Reading(
        meter=meter,
        channel=channel,
        timestamp=p.t,
        value=None if p.v is None else p.v * multiplier,
        raw=p.raw,
        scaler=p.scaler,
        multiplier=multiplier,
        unit=unit,
        kind=kind,
        qualities=tuple(p.q),
        source=source,
    )


class ConcentratorLink:
    def __init__(
        self,
        host: str,
        port: int,
        outbox: Outbox,
        *,
        headend_id: str = "headend",
        username: str | None = None,
        password: str | None = None,
        multipliers: Mapping[str, float] | None = None,
        known_meters: set[str] | None = None,
        max_batch: int = 500,
        command_timeout: float = 10.0,
        gap_grace: float = 5.0,
        reconnect_min: float = 0.2,
        reconnect_max: float = 30.0,
        protocol: aiomqtt.ProtocolVersion = aiomqtt.ProtocolVersion.V5,
        monotonic: Callable[[], float] = time.monotonic,
        observer: bool = False,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """`observer`: states and command answers only, no data and no session kept on the
        broker (commissioning tools: they must not take the head-end's data)."""
        self.observer = observer
        self.tls = tls
        self.host = host
        self.port = port
        self.outbox = outbox
        self.headend_id = headend_id
        self.username = username
        self.password = password
        self.multipliers = dict(multipliers or {})
        #: The registry's meters; data for any other meter is refused (quarantined). None: no check.
        self.known_meters = known_meters
        self.max_batch = max_batch
        self.command_timeout = command_timeout
        self.gap_grace = gap_grace
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.protocol = protocol
        self.monotonic = monotonic
        self.stats = LinkStats()
        self.concentrators: dict[str, ConcentratorState] = {}
        self.connected = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._pending: dict[str, asyncio.Future[Response]] = {}
        self._changed = asyncio.Condition()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_config(
        cls, link: MqttLink, outbox: Outbox, config: Config, env: Mapping[str, str] | None = None, **kwargs: Any
    ) -> ConcentratorLink:
        """A link for an `[[links]] kind = "mqtt"` entry: the registry's meters behind its
        concentrators are the only ones accepted, with their CT/PT multipliers."""
        env = os.environ if env is None else env
        password = None
        if link.password_env is not None:
            if link.password_env not in env:
                raise LinkDown(f"link {link.id}: password variable {link.password_env} is not set")
            password = env[link.password_env]
        concentrators = {c.id for c in config.concentrators if c.link == link.id}
        meters = [m for m in config.meters if m.concentrator in concentrators]
        return cls(
            link.host,
            link.port,
            outbox,
            username=link.username,
            password=password,
            known_meters={m.id for m in meters},
            multipliers={m.id: m.multiplier for m in meters},
            command_timeout=link.timeout.total_seconds(),
            tls=link.tls_context(),
            **kwargs,
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self.run(), name=f"mqtt-link-{self.host}:{self.port}")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _new_client(self) -> aiomqtt.Client:
        v5 = self.protocol == aiomqtt.ProtocolVersion.V5
        props = None
        if v5 and not self.observer:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY_S
        client = aiomqtt.Client(
            self.host,
            self.port,
            identifier=f"headend-{self.headend_id}",
            username=self.username,
            password=self.password,
            protocol=self.protocol,
            clean_session=None if v5 else self.observer,
            clean_start=self.observer if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
            keepalive=15,
            tls_context=self.tls,
        )
        # Acks are sent by us after the outbox commit. Set before connecting: a persistent
        # session's queued messages arrive right after CONNACK. (aiomqtt has no public API
        # for this yet: empicano/aiomqtt#345.)
        client._client.manual_ack_set(True)
        return client

    async def run(self) -> None:
        self._load_cursors()
        backoff = self.reconnect_min
        while not self._stop.is_set():
            client = self._new_client()
            try:
                async with client:
                    self._client = client
                    self.stats.connects += 1
                    await client.subscribe(STATE_FILTER, qos=1)
                    if not self.observer:
                        await client.subscribe(DATA_FILTER, qos=1)
                    await client.subscribe(response_topic(self.headend_id), qos=1)
                    self.connected.set()
                    backoff = self.reconnect_min
                    log.info("connected to MQTT broker %s:%d (%s)", self.host, self.port, self.protocol.name)
                    watcher = asyncio.create_task(self._watch_gaps())
                    try:
                        async for message in client.messages:
                            batch = [message]
                            while len(batch) < self.max_batch and len(client.messages) > 0:
                                batch.append(await anext(client.messages))
                            await self._handle(batch)
                            # In arrival order, as MQTT requires, and only after the commit.
                            for m in batch:
                                if m.qos > 0:
                                    client._client.ack(m.mid, m.qos)
                    finally:
                        watcher.cancel()
            except aiomqtt.MqttCodeError as exc:
                if self.protocol == aiomqtt.ProtocolVersion.V5 and exc.rc in (1, 0x84):
                    log.warning("broker %s:%d refuses MQTT 5; falling back to 3.1.1", self.host, self.port)
                    self.protocol = aiomqtt.ProtocolVersion.V311
                    continue
                log.warning("MQTT broker %s:%d: %s; retrying in %.1fs", self.host, self.port, exc, backoff)
            except aiomqtt.MqttError as exc:
                log.warning("MQTT broker %s:%d: %s; reconnecting in %.1fs", self.host, self.port, exc, backoff)
            finally:
                self.connected.clear()
                self._client = None
                self._fail_pending(LinkDown(f"MQTT broker {self.host}:{self.port} connection lost"))
                async with self._changed:
                    self._changed.notify_all()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, self.reconnect_max)

    def _load_cursors(self) -> None:
        for key, value in self.outbox.cursors("mqtt:").items():
            _, concentrator, name = key.split(":", 2)
            state = self.concentrators.setdefault(concentrator, ConcentratorState(concentrator))
            if name == "watermark":
                state.watermark = value
            elif name == "highest":
                state.highest = value
        now = self.monotonic()
        for state in self.concentrators.values():
            # Anything between the watermark and the highest seq may have been lost in the crash.
            for seq in range(state.watermark + 1, state.highest + 1):
                state.missing_since.setdefault(seq, now)

    def _fail_pending(self, error: MeterError) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()

    # -- incoming ----------------------------------------------------------------------

    async def _handle(self, batch: Sequence[aiomqtt.Message]) -> None:
        """Handle messages already received; their readings commit in one outbox transaction.

        Runs under the state condition, so `until()` never sees a sequence or counter that
        is ahead of what the outbox holds.
        """
        async with self._changed:
            await self._handle_batch(batch)
            self._changed.notify_all()

    async def _handle_batch(self, batch: Sequence[aiomqtt.Message]) -> None:
        readings: list[Reading] = []
        touched: set[str] = set()
        for message in batch:
            self.stats.received += 1
            topic = str(message.topic)
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
            try:
                if topic == response_topic(self.headend_id):
                    self._on_response(Response.model_validate_json(payload))
                elif topic.endswith("/state"):
                    self._on_state(concentrator_of(topic), State.model_validate_json(payload))
                elif topic.endswith("/data"):
                    concentrator = concentrator_of(topic)
                    readings += await self._on_data(concentrator, topic, Data.model_validate_json(payload))
                    touched.add(concentrator)
            except (ValidationError, ValueError, InvalidReading) as exc:
                await self._bad(topic, payload, str(exc))
        if touched:
            cursors: dict[str, int] = {}
            for concentrator in touched:
                c = self.concentrators[concentrator]
                watermark_key, highest_key = _cursor_keys(concentrator)
                cursors |= {watermark_key: c.watermark, highest_key: c.highest}
            await self.outbox.accept(readings, cursors=cursors)
            self.stats.accepted_readings += len(readings)

    async def _bad(self, topic: str, payload: bytes, reason: str) -> None:
        reason = reason.replace("\n", "; ")[:500]
        log.error("bad MQTT message on %s (%s); raw %s", topic, reason, payload[:200].hex())
        # Kept, not dropped: the raw message goes to the outbox's quarantine before the ack.
        await self.outbox.quarantine_raw(f"mqtt {topic}", payload, reason)
        self.stats.bad_messages += 1  # counted once it is durably kept

    def _on_state(self, concentrator: str, state: State) -> None:
        c = self.concentrators.setdefault(concentrator, ConcentratorState(concentrator))
        if state.bdseq < c.bdseq:
            log.info("%s: stale %s (bdseq %d < %d) ignored", concentrator, state.status, state.bdseq, c.bdseq)
            return
        c.bdseq = state.bdseq
        c.online = state.status == "online"
        if state.status == "online":
            c.firmware = state.firmware
            c.meters = {m.id: m for m in state.meters}
            if state.seq is not None and c.highest < 0 and c.watermark < 0:
                # First contact: start counting from here, do not ask for the concentrator's history.
                c.watermark = c.highest = state.seq
            elif state.seq is not None:
                now = self.monotonic()
                for gap in range(max(c.highest, c.watermark) + 1, state.seq + 1):
                    c.missing_since.setdefault(gap, now)
        log.info("%s is %s (bdseq %d, %d meters)", concentrator, state.status, state.bdseq, len(c.meters))

    async def _on_data(self, concentrator: str, topic: str, data: Data) -> list[Reading]:
        c = self.concentrators.setdefault(concentrator, ConcentratorState(concentrator))
        if data.seq <= c.watermark or data.seq in c.received_above:
            self.stats.duplicates += 1
            return []
        readings: list[Reading] = []
        for block in data.blocks:
            unknown = (c.meters and block.meter not in c.meters) or (
                self.known_meters is not None and block.meter not in self.known_meters
            )
            if unknown:
                reason = f"unknown meter {block.meter!r} (not in {concentrator}'s inventory or the registry)"
                await self._bad(topic, block.model_dump_json().encode(), reason)
                continue
            readings += self._readings(concentrator, block)
        before = len(c.missing_since)
        c.note(data.seq, self.monotonic())
        if len(c.missing_since) > before:
            self.stats.gaps += 1
            log.warning("%s: seq gap before %d (%d missing)", concentrator, data.seq, len(c.missing_since))
        return readings

    def _readings(self, concentrator: str, block: Block) -> list[Reading]:
        multiplier = self.multipliers.get(block.meter, 1.0)
        source = f"mqtt/{concentrator}"
        m, ch, kind, unit = block.meter, block.channel, block.kind, block.unit
        return [point_reading(m, ch, kind, unit, p, multiplier, source) for p in block.readings]

    def _on_response(self, response: Response) -> None:
        future = self._pending.pop(response.correlation_id, None)
        if future is None:
            log.info("response %s matches no pending command (late or duplicate)", response.correlation_id)
        elif not future.done():
            future.set_result(response)

    async def _watch_gaps(self) -> None:
        while True:
            now = self.monotonic()
            for c in list(self.concentrators.values()):
                if not c.online:
                    continue
                for first, last in c.overdue(now, self.gap_grace):
                    c.requested.update(range(first, last + 1))
                    self.stats.backfills += 1
                    log.warning("%s: seq %d..%d still missing, asking for a backfill", c.id, first, last)
                    asyncio.create_task(self._backfill(c.id, first, last))  # noqa: RUF006 - fire and log
            await asyncio.sleep(self.gap_grace / 4)  # a periodic check, not a wait for an event

    async def _backfill(self, concentrator: str, first: int, last: int) -> None:
        try:
            await self.command(concentrator, "backfill", args={"seq_from": first, "seq_to": last})
        except MeterError as exc:
            log.warning("%s: backfill %d..%d failed (%s); will ask again", concentrator, first, last, exc)
            c = self.concentrators[concentrator]
            c.requested.difference_update(range(first, last + 1))

    # -- outgoing ----------------------------------------------------------------------

    async def command(
        self,
        concentrator: str,
        name: str,
        *,
        meter: str | None = None,
        args: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Response:
        """Send a command and wait for its answer; errors map onto MeterSession errors."""
        client = self._client
        state = self.concentrators.get(concentrator)
        if client is None:
            raise LinkDown(f"not connected to the MQTT broker {self.host}:{self.port}", meter=meter)
        if state is None or not state.online:
            raise LinkDown(f"concentrator {concentrator} is offline", meter=meter)
        correlation = uuid.uuid4().hex
        reply_to = response_topic(self.headend_id)
        body = Command(correlation_id=correlation, reply_to=reply_to, meter=meter, args=dict(args or {}))
        props = None
        if self.protocol == aiomqtt.ProtocolVersion.V5:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = reply_to
            props.CorrelationData = correlation.encode()
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._pending[correlation] = future
        try:
            await client.publish(command_topic(concentrator, name), body.model_dump_json(), qos=1, properties=props)
            response = await asyncio.wait_for(future, timeout or self.command_timeout)
        except TimeoutError:
            raise Timeout(
                f"{concentrator} did not answer {name} within {timeout or self.command_timeout}s", meter=meter
            ) from None
        except aiomqtt.MqttError as exc:
            raise LinkDown(f"publishing {name} to {concentrator}: {exc}", meter=meter) from exc
        finally:
            self._pending.pop(correlation, None)
        if response.status == "error":
            error = _ERRORS.get(response.error or "", Refused)
            raise error(f"{concentrator} {name}: {response.error}: {response.message or ''}".rstrip(": "), meter=meter)
        return response

    async def until(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        """Wait until `predicate()` holds after some message was handled (tests, CLI)."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)

    def session(self, meter: str, concentrator: str) -> ConcentratorMeterSession:
        return ConcentratorMeterSession(self, meter, concentrator, self.multipliers.get(meter, 1.0))


class ConcentratorMeterSession:
    """MeterSession for a meter behind a concentrator: every call is a command round trip."""

    def __init__(self, link: ConcentratorLink, meter: str, concentrator: str, multiplier: float = 1.0) -> None:
        self.link = link
        self.meter = meter
        self.concentrator = concentrator
        self.multiplier = multiplier
        self.source = f"mqtt/{concentrator}"

    async def __aenter__(self) -> Self:
        state = self.link.concentrators.get(self.concentrator)
        if state is None or not state.online:
            raise LinkDown(f"concentrator {self.concentrator} is offline", meter=self.meter)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    async def _call(self, name: str, **args: Any) -> dict[str, Any]:
        response = await self.link.command(self.concentrator, name, meter=self.meter, args=args)
        return response.result

    def _parse(self, build: Callable[[], list[Reading]]) -> list[Reading]:
        try:
            return build()
        except (ValidationError, ValueError, KeyError, TypeError) as exc:
            raise BadFrame(f"{self.concentrator} answered with an unreadable result: {exc}", meter=self.meter) from None

    async def read_registers(self, channels: Sequence[Obis]) -> list[Reading]:
        result = await self._call("read", channels=[str(c) for c in channels])

        def build() -> list[Reading]:
            out = []
            for r in result["readings"]:
                point = Point.model_validate(r["point"])
                channel = Obis.parse(r["channel"])
                out.append(
                    point_reading(
                        self.meter, channel, "register", r.get("unit", ""), point, self.multiplier, self.source
                    )
                )
            return out

        return self._parse(build)

    async def read_profile(self, profile: Obis, since: datetime, until: datetime | None = None) -> list[Reading]:
        until = until or datetime.now(UTC)
        result = await self._call("profile", profile=str(profile), start=since.isoformat(), end=until.isoformat())

        def build() -> list[Reading]:
            channel, unit = Obis.parse(result["channel"]), result.get("unit", "")
            points = [Point.model_validate(p) for p in result["points"]]
            return [
                point_reading(self.meter, channel, "interval", unit, p, self.multiplier, self.source) for p in points
            ]

        return self._parse(build)

    async def read_events(self, since: datetime, until: datetime | None = None) -> list[Reading]:
        until = until or datetime.now(UTC)
        result = await self._call("events", start=since.isoformat(), end=until.isoformat())

        def build() -> list[Reading]:
            events = [(datetime.fromisoformat(e["t"]), int(e["code"])) for e in result["events"]]
            if any(t.tzinfo is None for t, _c in events):
                raise ValueError("event time without a timezone")
            return [r for r in event_readings(self.meter, events, self.source) if since < r.timestamp <= until]

        return self._parse(build)

    async def read_clock(self) -> datetime:
        result = await self._call("clock")
        try:
            return datetime.fromisoformat(result["time"])
        except (KeyError, ValueError, TypeError) as exc:
            raise BadFrame(f"{self.concentrator} clock answer unreadable: {exc}", meter=self.meter) from None

    async def set_clock(self, t: datetime) -> None:
        await self._call("clock_sync", time=t.isoformat())

    async def read_relay(self) -> RelayState:
        result = await self._call("relay_state")
        try:
            return RelayState(result["state"])
        except (KeyError, ValueError) as exc:
            raise BadFrame(f"{self.concentrator} relay state unreadable: {exc}", meter=self.meter) from None

    async def operate_relay(self, action: RelayAction) -> None:
        """Send the switching command. Confirmation is the caller's read_relay(), never assumed."""
        await self._call("relay", action=action.value)
