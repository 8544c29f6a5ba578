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
  payload for v3.1.1), and are answered on the commanded concentrator's own response topic.
  An answer counts only from that topic and only for the commanded meter and command (with
  a broker ACL, nobody else can publish there: config/mosquitto/). Relay answers are held
  for `answer_grace` seconds: a second, different answer to the same command means someone
  else is answering for the concentrator, and neither is believed.
- Broker gone: reconnect with exponential backoff and jitter, forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
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
from headend.model import (
    InvalidReading,
    Obis,
    Reading,
    ReadingKind,
    RelayAction,
    RelayState,
    event_readings,
    exact_product,
    printable,
)
from headend.protocols import mqtt_data
from headend.protocols.base import BadFrame, LinkDown, MeterError, Refused, Timeout, Unsupported
from headend.protocols.mqtt_schema import (
    DATA_FILTER,
    RESPONSE_FILTER,
    STATE_FILTER,
    Command,
    InventoryMeter,
    Point,
    Response,
    State,
    command_topic,
    concentrator_of,
    response_topic,
)
from headend.storage.outbox import Outbox
from headend.supervisor import Supervisor

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 86_400
#: QoS 1 messages the broker may have in flight to the head-end (MQTT 5 Receive Maximum):
#: with the acks sent only after the commit, this and MAX_PACKET bound what a flood can
#: pile up in memory (100 MiB). A batch of 100 messages of 1,000 values commits at once.
RECEIVE_MAXIMUM = 100
#: The largest packet the broker may send the head-end (MQTT 5 Maximum Packet Size): larger
#: ones are dropped by the broker. A concentrator sends a day of a few hundred meters per
#: message at most (a day of one meter's quarter hours is about 6 KB).
MAX_PACKET = 1024 * 1024
#: QoS 0 messages (and their bytes) received and not yet handled, at most; beyond it they
#: are dropped and counted (concentrators publish data with QoS 1, which the Receive
#: Maximum bounds).
MAX_QUEUED_QOS0 = 5000
MAX_QUEUED_QOS0_BYTES = 16 * 1024 * 1024


class IngestQueue(asyncio.Queue[aiomqtt.Message]):
    """aiomqtt's queue of received messages. A QoS 1 or 2 message always goes in: it is never
    dropped unacknowledged (it would hold one of the broker's Receive Maximum slots until the
    next reconnect, and enough of them stall ingest with the link up); the broker sends at
    most RECEIVE_MAXIMUM of them unacknowledged. A QoS 0 message goes in only while fewer
    than MAX_QUEUED_QOS0 wait: a flood of them is dropped here, counted, never queued."""

    def __init__(self, maxsize: int = 0, *, on_drop: Callable[[], None] = lambda: None) -> None:
        super().__init__(maxsize=0)  # bounded by the rules above, not by a count that drops anything
        self.on_drop = on_drop
        self.qos0 = 0
        self.qos0_bytes = 0

    def put_nowait(self, item: aiomqtt.Message) -> None:
        if item.qos == 0:
            size = len(item.payload) if isinstance(item.payload, bytes | bytearray | str) else 0
            if self.qos0 >= MAX_QUEUED_QOS0 or self.qos0_bytes + size > MAX_QUEUED_QOS0_BYTES:
                self.on_drop()
                return
            self.qos0, self.qos0_bytes = self.qos0 + 1, self.qos0_bytes + size
        super().put_nowait(item)

    def _get(self) -> aiomqtt.Message:
        item: aiomqtt.Message = super()._get()  # type: ignore[misc]
        if item.qos == 0:
            size = len(item.payload) if isinstance(item.payload, bytes | bytearray | str) else 0
            self.qos0, self.qos0_bytes = self.qos0 - 1, self.qos0_bytes - size
        return item
#: Messages (bytes) and blocks (points) handled in a worker thread rather than on the loop.
BIG_MESSAGE = 64 * 1024
BIG_BLOCK = 1000
#: Characters of a topic kept in the quarantine and the log.
MAX_TOPIC_KEPT = 200


class ThrottledLog:
    """What the broker's clients make the head-end say is logged at most `per_minute` times a
    minute in full, then counted in one line: a flood cannot fill the disk through the log."""

    def __init__(self, per_minute: int = 20, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.monotonic = monotonic
        self._window = 0.0
        self._logged = 0
        self._silenced = 0

    def emit(self, level: int, msg: str, *args: object) -> None:
        now = self.monotonic()
        if now - self._window >= 60:
            if self._silenced:
                log.warning("%d more MQTT messages refused or bad in the last minute (not logged one by one)",
                            self._silenced)  # fmt: skip
            self._window, self._logged, self._silenced = now, 0, 0
        if self._logged < self.per_minute:
            self._logged += 1
            log.log(level, msg, *args)
        else:
            self._silenced += 1

    def note(self, topic: str, payload: bytes, reason: str) -> None:
        self.emit(logging.ERROR, "bad MQTT message on %s (%s); raw %s", topic[:MAX_TOPIC_KEPT], reason,
                  payload[:200].hex())  # fmt: skip

    def unkept(self, count: int, cap: int) -> None:
        self.emit(logging.ERROR, "%d bad MQTT messages not kept: the quarantine is full (%d raw messages or its "
                  "byte cap); `headend quarantine list`, then `drop-raw`", count, cap)  # fmt: skip


_ERRORS: dict[str, type[MeterError]] = {
    "unknown_meter": Refused,
    "refused": Refused,
    "bad_request": Refused,
    "meter_timeout": Timeout,
    "unsupported": Unsupported,
}


@dataclass
class Gap:
    """Seqs first..last not received yet, noticed at `since` (monotonic)."""

    first: int
    last: int
    since: float
    requested: bool = False


#: Gaps kept per concentrator at most; beyond, the oldest is given up (logged as lost).
MAX_GAPS = 1000


@dataclass
class ConcentratorState:
    id: str
    online: bool = False
    bdseq: int = -1
    firmware: str | None = None
    meters: dict[str, InventoryMeter] = field(default_factory=dict)
    #: The largest seq seen; every seq up to it was received except those in `gaps`. Memory
    #: is bounded by the number of gaps (ranges), not by the size of a jump. None until the
    #: concentrator's birth (or the stored cursors) says where counting starts: data before
    #: that is taken, but its seq is not trusted to set the count.
    highest: int | None = None
    gaps: list[Gap] = field(default_factory=list)

    @property
    def watermark(self) -> int:
        """All seqs <= watermark have been received."""
        if self.highest is None:
            return -1
        return self.gaps[0].first - 1 if self.gaps else self.highest

    def seen(self, seq: int) -> bool:
        if self.highest is None:
            return False
        return seq <= self.highest and not any(g.first <= seq <= g.last for g in self.gaps)

    def note(self, seq: int, now: float) -> bool:
        """Record a data seq; return False if it was already received."""
        if self.highest is None:
            return True
        if self.seen(seq):
            return False
        if seq > self.highest:
            if seq > self.highest + 1:
                self._open(self.highest + 1, seq - 1, now)
            self.highest = seq
            return True
        for i, gap in enumerate(self.gaps):  # a late arrival fills (part of) a gap
            if gap.first <= seq <= gap.last:
                parts = [Gap(a, b, gap.since, gap.requested) for a, b in ((gap.first, seq - 1), (seq + 1, gap.last))
                         if a <= b]  # fmt: skip
                self.gaps[i : i + 1] = parts
                break
        return True

    def expect(self, upto: int, now: float) -> None:
        """The concentrator says it published up to `upto` (its birth): the rest is missing."""
        if self.highest is None:
            self.highest = upto
        elif upto > self.highest:
            self._open(self.highest + 1, upto, now)
            self.highest = upto

    def _open(self, first: int, last: int, now: float) -> None:
        self.gaps.append(Gap(first, last, now))
        if len(self.gaps) > MAX_GAPS:
            lost = self.gaps.pop(0)
            log.error("%s: more than %d seq gaps; seqs %d..%d given up as lost", self.id, MAX_GAPS, lost.first,
                      lost.last)  # fmt: skip

    def restore(self, watermark: int, highest: int, now: float) -> None:
        """After a restart: anything between the stored watermark and highest may be lost."""
        self.highest = max(highest, watermark)
        self.gaps = [Gap(watermark + 1, highest, now)] if highest > watermark else []

    def overdue(self, now: float, grace: float) -> list[Gap]:
        """Gaps older than `grace` not yet asked for."""
        return [g for g in self.gaps if now - g.since >= grace and not g.requested]


@dataclass
class LinkStats:
    received: int = 0
    accepted_readings: int = 0
    duplicates: int = 0
    bad_messages: int = 0
    gaps: int = 0
    backfills: int = 0
    connects: int = 0
    #: Answers refused: on another concentrator's topic, for another meter or command, or
    #: contradicting an earlier answer to the same command (forged or misrouted).
    refused_answers: int = 0
    #: State messages of concentrators this link does not have.
    refused_messages: int = 0
    #: Bad messages not kept because the quarantine was full of raw messages.
    unkept_bad_messages: int = 0
    #: QoS 0 messages dropped unread while MAX_QUEUED_QOS0 others waited (a flood).
    dropped_qos0: int = 0


#: Commands whose answers say what a relay did: held for `answer_grace` against a contradiction.
RELAY_COMMANDS = frozenset({"relay", "relay_state"})


@dataclass
class _Pending:
    concentrator: str
    meter: str | None
    name: str
    future: asyncio.Future[Response]
    conflict: str | None = None


def _answer_keys(config: Config, concentrators: set[str], env: Mapping[str, str]) -> dict[str, bytes]:
    keys = {}
    for c in config.concentrators:
        if c.id in concentrators and c.answer_key_env is not None:
            try:
                keys[c.id] = bytes.fromhex(env[c.answer_key_env])
            except KeyError:
                raise LinkDown(f"concentrator {c.id}: answer key variable {c.answer_key_env} is not set") from None
            except ValueError:
                raise LinkDown(f"concentrator {c.id}: {c.answer_key_env} is not hex") from None
            if len(keys[c.id]) < 16:
                raise LinkDown(f"concentrator {c.id}: the answer key must be 16 bytes or more")
    return keys


def _cursor_keys(concentrator: str) -> tuple[str, str]:
    return f"mqtt:{concentrator}:watermark", f"mqtt:{concentrator}:highest"


def point_reading(
    meter: str, channel: Obis, kind: ReadingKind, unit: str, p: Point, multiplier: float, source: str
) -> Reading:
    return Reading(
        meter=meter,
        channel=channel,
        timestamp=p.t,
        value=None if p.v is None else p.v if multiplier == 1.0 else exact_product(p.v, multiplier),
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
        meters_of: Mapping[str, set[str]] | None = None,
        max_seq_gap: int = 10_000,
        answer_keys: Mapping[str, bytes] | None = None,
        max_batch: int = 500,
        command_timeout: float = 10.0,
        gap_grace: float = 5.0,
        reconnect_min: float = 0.2,
        reconnect_max: float = 30.0,
        protocol: aiomqtt.ProtocolVersion = aiomqtt.ProtocolVersion.V5,
        monotonic: Callable[[], float] = time.monotonic,
        observer: bool = False,
        tls: ssl.SSLContext | None = None,
        answer_grace: float = 0.5,
        client_id: str | None = None,
        supervisor: Supervisor | None = None,
    ) -> None:
        """`observer`: states and command answers only, no data and no session kept on the
        broker (commissioning tools: they must not take the head-end's data)."""
        self.observer = observer
        self.tls = tls
        self.answer_grace = answer_grace
        self.supervisor = supervisor or Supervisor()
        self.client_id = client_id or f"headend-{headend_id}"
        self.host = host
        self.port = port
        self.outbox = outbox
        self.headend_id = headend_id
        self.username = username
        self.password = password
        self.multipliers = dict(multipliers or {})
        #: The registry's concentrators of this link and the meters behind each: data from any
        #: other concentrator, or for a meter not behind the one sending it, is refused
        #: (quarantined). None: no check (tools).
        self.meters_of = {k: set(v) for k, v in meters_of.items()} if meters_of is not None else None
        #: A seq further than this past the highest seen is refused, not taken for a gap.
        self.max_seq_gap = max_seq_gap
        #: Concentrators whose answers must carry a valid HMAC (their answer key).
        self.answer_keys = dict(answer_keys or {})
        self.max_batch = max_batch
        self.command_timeout = command_timeout
        self.gap_grace = gap_grace
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.protocol = protocol
        self.monotonic = monotonic
        self.stats = LinkStats()
        #: What clients make this link say (bad messages, births, gaps), throttled.
        self._said = ThrottledLog()
        self._bad_batch: list[tuple[str, bytes, str]] = []
        self.concentrators: dict[str, ConcentratorState] = {}
        self.connected = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._pending: dict[str, _Pending] = {}
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
            if not link.tls:
                log.warning("link %s: a broker password without TLS crosses the network in clear; set tls = true",
                            link.id)  # fmt: skip
        concentrators = {c.id for c in config.concentrators if c.link == link.id}
        unsigned = sorted(c.id for c in config.concentrators if c.link == link.id and c.answer_key_env is None)
        if unsigned and link.username is None:
            # Without per-device credentials (and so without the ACL) and without answer keys,
            # any client on the broker can read commands and answer them before a slow
            # concentrator does: the confirming read-back is still required, but a forger can
            # fail commands that would have succeeded.
            log.warning("link %s: anonymous broker and no answer_key_env for %s: any client on the broker can "
                        "read relay commands and answer them first; see docs/mqtt.md (Security)",
                        link.id, ", ".join(unsigned[:5]) + (" ..." if len(unsigned) > 5 else ""))  # fmt: skip
        meters = [m for m in config.meters if m.concentrator in concentrators]
        meters_of: dict[str, set[str]] = {c: set() for c in concentrators}
        for m in meters:
            meters_of[m.concentrator or ""].add(m.id)
        return cls(
            link.host,
            link.port,
            outbox,
            username=link.username,
            password=password,
            meters_of=meters_of,
            answer_keys=_answer_keys(config, concentrators, env),
            max_seq_gap=link.max_seq_gap,
            client_id=link.client_id,
            multipliers={m.id: m.multiplier for m in meters},
            command_timeout=link.timeout.total_seconds(),
            tls=link.tls_context(),
            **kwargs,
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        # Supervised: MqttError is the loop's own business (reconnect); anything else (a bug,
        # the outbox failing) restarts the link instead of ending ingest for good.
        self._task = self.supervisor.start(f"mqtt-link-{self.host}:{self.port}", self.run)
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
        if v5:
            props = Properties(PacketTypes.CONNECT)
            props.ReceiveMaximum = RECEIVE_MAXIMUM
            props.MaximumPacketSize = MAX_PACKET
            if not self.observer:
                props.SessionExpiryInterval = SESSION_EXPIRY_S
        client = aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.client_id,
            username=self.username,
            password=self.password,
            protocol=self.protocol,
            clean_session=None if v5 else self.observer,
            clean_start=self.observer if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
            keepalive=15,
            tls_context=self.tls,
            queue_type=functools.partial(IngestQueue, on_drop=self._dropped_qos0),  # type: ignore[arg-type]
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
                    await client.subscribe(RESPONSE_FILTER, qos=1)
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

    def _dropped_qos0(self) -> None:
        self.stats.dropped_qos0 += 1

    def _load_cursors(self) -> None:
        stored: dict[str, dict[str, int]] = {}
        for key, value in self.outbox.cursors("mqtt:").items():
            _, concentrator, name = key.split(":", 2)
            stored.setdefault(concentrator, {})[name] = value
        now = self.monotonic()
        # What was committed is the truth: a (re)start after a failure between noting a seq
        # and committing its readings must not take the redelivered message for a duplicate.
        for state in self.concentrators.values():
            state.highest, state.gaps = None, []
        for concentrator, values in stored.items():
            state = self.concentrators.setdefault(concentrator, ConcentratorState(concentrator))
            watermark = values.get("watermark", -1)
            state.restore(watermark, values.get("highest", watermark), now)
            state.bdseq = values.get("bdseq", state.bdseq)

    def _fail_pending(self, error: MeterError) -> None:
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(error)
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
        readings = mqtt_data.SeriesBuilder(time.time_ns())
        touched: set[str] = set()
        self._bad_batch = []
        for message in batch:
            self.stats.received += 1
            topic = str(message.topic)
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
            try:
                if topic.endswith("/resp"):
                    self._on_response(concentrator_of(topic), Response.model_validate_json(payload))
                elif topic.endswith("/state"):
                    self._on_state(concentrator_of(topic), State.model_validate_json(payload))
                elif topic.endswith("/data"):
                    concentrator = concentrator_of(topic)
                    # A big message is decoded in a worker thread: the event loop (the API,
                    # switching) gets its turns meanwhile.
                    data = (await asyncio.to_thread(mqtt_data.decode, payload) if len(payload) > BIG_MESSAGE
                            else mqtt_data.decode(payload))  # fmt: skip
                    parts = await self._on_data(concentrator, topic, payload, data, big=len(payload) > BIG_MESSAGE)
                    readings.add(parts, f"mqtt/{concentrator}")
                    # A turn for the rest of the loop (the API, switching) between messages: a
                    # batch of hundreds of messages just under BIG_MESSAGE is seconds of work.
                    await asyncio.sleep(0)
                    touched.add(concentrator)
            except (ValidationError, ValueError, InvalidReading) as exc:
                self._bad(topic, payload, str(exc))
            except Exception as exc:
                # A bug or an input nobody foresaw: this message is kept aside, the rest go on
                # (re-raised it would be redelivered after the restart, and stop it again).
                log.exception("MQTT message on %s could not be handled", topic[:200])
                self._bad(topic, payload, f"could not be handled: {type(exc).__name__}: {exc}")
        await self._keep_bad()
        if touched:
            cursors: dict[str, int] = {}
            for concentrator in touched:
                c = self.concentrators.get(concentrator)
                if c is not None and c.highest is not None:
                    watermark_key, highest_key = _cursor_keys(concentrator)
                    cursors |= {watermark_key: c.watermark, highest_key: c.highest}
                    if c.bdseq >= 0:  # which birth these seqs count from, for after a restart
                        cursors[f"mqtt:{concentrator}:bdseq"] = c.bdseq
            self.stats.accepted_readings += await self.outbox.accept_series(readings.series(), cursors=cursors)

    def _bad(self, topic: str, payload: bytes, reason: str) -> None:
        """Note a message that is refused or does not parse; kept by `_keep_bad` before the ack."""
        reason = reason.replace("\n", "; ")[:500]
        self.stats.bad_messages += 1
        self._said.note(topic, payload, reason)
        self._bad_batch.append((f"mqtt {topic[:MAX_TOPIC_KEPT]}", payload, reason))

    async def _keep_bad(self) -> None:
        """Keep the batch's bad messages in the outbox's quarantine, in one transaction (the
        same bytes again are one row), up to the quarantine's caps."""
        if not self._bad_batch:
            return
        bad, self._bad_batch = self._bad_batch, []
        kept = await asyncio.to_thread(self.outbox.quarantine_raw_many_sync, bad)
        if kept < len(bad):
            self.stats.unkept_bad_messages += len(bad) - kept
            self._said.unkept(len(bad) - kept, self.outbox.max_raw_quarantine)

    def _on_state(self, concentrator: str, state: State) -> None:
        if not self._configured(concentrator):
            self._said.emit(logging.WARNING, "state of %s refused: not a concentrator of this link",
                               concentrator[:64])  # fmt: skip
            self.stats.refused_messages += 1
            return
        c = self.concentrators.setdefault(concentrator, ConcentratorState(concentrator))
        # A birth is the concentrator's own word and always counts; a death counts only for
        # the birth it belongs to (same bdseq), so a stale Will or a forged retained
        # "offline" with a huge bdseq cannot hold a concentrator offline.
        if state.status == "offline" and c.online and state.bdseq != c.bdseq:
            self._said.emit(logging.INFO, "%s: offline for bdseq %d ignored (current birth %d)", concentrator,
                               state.bdseq, c.bdseq)  # fmt: skip
            return
        reborn = state.status == "online" and state.bdseq != c.bdseq
        c.bdseq = state.bdseq
        c.online = state.status == "online"
        if state.status == "online":
            c.firmware = state.firmware
            c.meters = {m.id: m for m in state.meters}
            if state.seq is not None and c.highest is None:
                # First contact: start counting from here, do not ask for the concentrator's history.
                c.highest = state.seq
            elif state.seq is not None and c.highest is not None:
                if reborn and state.seq < c.highest:
                    # A new connection counting from lower down: a replaced or reset unit. Its
                    # new messages are not the old ones: count from here, never drop them.
                    self._said.emit(logging.WARNING, "%s: birth %d says seq %d, below the %d seen before: "
                                       "counting starts again",
                                concentrator, state.bdseq, state.seq, c.highest)  # fmt: skip
                    c.highest, c.gaps = state.seq, []
                elif state.seq > c.highest + self.max_seq_gap:
                    self._said.emit(logging.ERROR, "%s: birth says seq %d, %d past the highest seen: not treated "
                                       "as a gap (max_seq_gap "
                              "%d)", concentrator, state.seq, state.seq - c.highest, self.max_seq_gap)  # fmt: skip
                else:
                    c.expect(state.seq, self.monotonic())
        self._said.emit(logging.INFO, "%s is %s (bdseq %d, %d meters)", concentrator, state.status, state.bdseq,
                           len(c.meters))  # fmt: skip

    def _configured(self, concentrator: str) -> bool:
        return self.meters_of is None or concentrator in self.meters_of

    async def _on_data(self, concentrator: str, topic: str, payload: bytes, data: mqtt_data.DataMessage, *,
                       big: bool = False) -> list[mqtt_data.Part]:  # fmt: skip
        if not self._configured(concentrator):
            self._bad(topic, payload, f"{concentrator} is not a concentrator of this link")
            return []
        c = self.concentrators.setdefault(concentrator, ConcentratorState(concentrator))
        if c.seen(data.seq):
            self.stats.duplicates += 1
            return []
        if c.highest is not None and data.seq > c.highest + self.max_seq_gap:
            # Not a gap to fill: a forged or broken seq would make us ask for millions.
            self._bad(topic, payload, f"seq {data.seq} is {data.seq - c.highest} past the highest seen "
                                      f"({c.highest}); more than max_seq_gap {self.max_seq_gap}")  # fmt: skip
            return []
        own = self.meters_of[concentrator] if self.meters_of is not None else None
        refused: list[str] = []
        blocks = []
        for block in data.blocks:
            unknown = (c.meters and block.meter not in c.meters) or (own is not None and block.meter not in own)
            if unknown:
                refused.append(block.meter)
            else:
                blocks.append(block)
        source = f"mqtt/{concentrator}"
        if not printable(source):
            raise ValueError(f"concentrator {concentrator!r} has control characters")
        readings = await asyncio.to_thread(self._parts, blocks) if big else self._parts(blocks)
        if refused:
            # The message once, whatever the number of blocks refused (the rest is stored).
            names = ", ".join(repr(m[:40]) for m in list(dict.fromkeys(refused))[:5])
            more = f" and {len(set(refused)) - 5} more" if len(set(refused)) > 5 else ""
            self._bad(topic, payload, f"{len(refused)} blocks refused: meter {names}{more} not behind {concentrator} "
                                      "(its inventory or the registry)")  # fmt: skip
        if not readings:
            return []  # nothing taken: the seq stays free for the genuine message
        gaps = len(c.gaps)
        c.note(data.seq, self.monotonic())
        if len(c.gaps) > gaps:
            self.stats.gaps += 1
            self._said.emit(logging.WARNING, "%s: seq gap before %d (%d gaps open)", concentrator, data.seq,
                               len(c.gaps))  # fmt: skip
        return readings

    def _parts(self, blocks: Sequence[mqtt_data.DataBlock]) -> list[mqtt_data.Part]:
        return [mqtt_data.part_of(b, self.multipliers.get(b.meter, 1.0)) for b in blocks]

    def _on_response(self, concentrator: str, response: Response) -> None:
        pending = self._pending.get(response.correlation_id)
        if pending is None:
            self._said.emit(logging.INFO, "response %s matches no pending command (late or duplicate)",
                               response.correlation_id)  # fmt: skip
            return
        asked = (pending.concentrator, pending.meter, pending.name)
        if (concentrator, response.meter, response.command) != asked:
            self.stats.refused_answers += 1
            self._said.emit(logging.ERROR, "answer to command %s refused: it came on %s's topic for meter %s, "
                               "command %s; the command went to %s for meter %s, command %s (forged or misrouted)",
                               response.correlation_id, concentrator[:64], response.meter, response.command,
                               *asked)  # fmt: skip
            return
        key = self.answer_keys.get(concentrator)
        expected = response.mac_with(concentrator, key).encode() if key is not None else b""
        if key is not None and not hmac.compare_digest((response.mac or "").encode(), expected):
            self.stats.refused_answers += 1
            self._said.emit(logging.ERROR, "answer to command %s for %s refused: its MAC does not verify with "
                               "%s's answer key (forged)", response.correlation_id, pending.meter,
                               concentrator)  # fmt: skip
            return
        if not pending.future.done():
            pending.future.set_result(response)
        elif pending.future.result() != response and pending.conflict is None:
            self.stats.refused_answers += 1
            pending.conflict = f"{pending.future.result().result} and then {response.result}"
            self._said.emit(logging.ERROR, "%s: two different answers to %s %s for %s: %s; someone else answers "
                               "for the concentrator",
                      concentrator, pending.name, response.correlation_id, pending.meter, pending.conflict)  # fmt: skip

    async def _watch_gaps(self) -> None:
        while True:
            now = self.monotonic()
            for c in list(self.concentrators.values()):
                if not c.online:
                    continue
                for gap in c.overdue(now, self.gap_grace):
                    gap.requested = True
                    self.stats.backfills += 1
                    log.warning("%s: seq %d..%d still missing, asking for a backfill", c.id, gap.first, gap.last)
                    asyncio.create_task(self._backfill(c.id, gap))  # noqa: RUF006 - fire and log
            await asyncio.sleep(self.gap_grace / 4)  # a periodic check, not a wait for an event

    async def _backfill(self, concentrator: str, gap: Gap) -> None:
        first, last = gap.first, gap.last
        try:
            await self.command(concentrator, "backfill", args={"seq_from": first, "seq_to": last})
        except MeterError as exc:
            log.warning("%s: backfill %d..%d failed (%s); will ask again", concentrator, first, last, exc)
            gap.requested = False

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
        reply_to = response_topic(concentrator)
        body = Command(correlation_id=correlation, reply_to=reply_to, meter=meter, args=dict(args or {}))
        props = None
        if self.protocol == aiomqtt.ProtocolVersion.V5:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = reply_to
            props.CorrelationData = correlation.encode()
        pending = _Pending(concentrator, meter, name, asyncio.get_running_loop().create_future())
        self._pending[correlation] = pending
        try:
            await client.publish(command_topic(concentrator, name), body.model_dump_json(), qos=1, properties=props)
            response = await asyncio.wait_for(asyncio.shield(pending.future), timeout or self.command_timeout)
            if name in RELAY_COMMANDS:
                await asyncio.sleep(self.answer_grace)  # room for a contradicting second answer
        except TimeoutError:
            raise Timeout(
                f"{concentrator} did not answer {name} within {timeout or self.command_timeout}s", meter=meter
            ) from None
        except aiomqtt.MqttError as exc:
            raise LinkDown(f"publishing {name} to {concentrator}: {exc}", meter=meter) from exc
        finally:
            self._pending.pop(correlation, None)
        if pending.conflict is not None:
            raise BadFrame(f"{concentrator} {name}: contradicting answers ({pending.conflict}); another client on the "
                           "broker answers for this concentrator: not trusted (see docs/mqtt.md, Security)",
                           meter=meter)  # fmt: skip
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

    profile_on_meter_clock = False

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
        except (ValidationError, ValueError, KeyError, TypeError, OverflowError) as exc:
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

    async def read_billing(self, since: datetime, until: datetime | None = None) -> list[Reading]:
        # The concentrator pushes its meters' daily frozen registers with the data.
        raise Unsupported("a concentrator pushes its meters' frozen registers; there is none to ask for",
                          meter=self.meter)  # fmt: skip

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
