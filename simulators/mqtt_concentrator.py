"""MQTT data concentrator simulator: K concentrators with N meters each (docs/mqtt.md).

Each concentrator connects with a Last Will (retained `offline` state), publishes a retained
birth with its inventory, publishes 15-minute interval blocks of its meters as time passes
(`publish_until()` with simulated time, or on the wall clock when run as a program), and
answers commands: read, profile, backfill, events, clock, clock_sync, relay, relay_state.

Faults: duplicate publishes, out-of-order pairs, dropped messages (sequence gaps, kept for
backfill), going offline without a clean disconnect, clock drift, stuck relays, ignored
commands.

    python -m simulators.mqtt_concentrator --broker 127.0.0.1:1883 --concentrators 3 --meters 50
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import socket
import ssl
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from headend.model import IMPORT_ENERGY, IMPORT_INTERVAL, Obis, RelayState
from headend.protocols.mqtt_schema import (
    Block,
    Command,
    Data,
    InventoryMeter,
    Point,
    Response,
    State,
    command_topic,
    data_topic,
    state_topic,
)
from simulators.clock import Clock
from simulators.physics import LoadModel

log = logging.getLogger(__name__)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class ConcentratorFaults:
    duplicate: bool = False
    out_of_order: bool = False
    drop_seqs: set[int] = field(default_factory=set)
    stuck_relays: set[str] = field(default_factory=set)
    clock_drift_s: float = 0.0
    ignore_commands: bool = False
    #: Operate relays but lose the answer (a head-end killed or cut off before it arrives).
    mute_relay_answers: bool = False
    #: Seconds before each answer goes out.
    answer_delay: float = 0.0


class SimulatedConcentrator:
    def __init__(
        self,
        concentrator_id: str,
        host: str,
        port: int,
        meters: list[str],
        clock: Clock,
        *,
        interval: timedelta = timedelta(minutes=15),
        firmware: str = "dc-sim 1.0",
        faults: ConcentratorFaults | None = None,
        protocol: aiomqtt.ProtocolVersion = aiomqtt.ProtocolVersion.V5,
        meters_per_message: int = 1000,
        backlog: timedelta = timedelta(0),
        tls: ssl.SSLContext | None = None,
        username: str | None = None,
        password: str | None = None,
        answer_key: bytes | None = None,
    ) -> None:
        self.tls = tls
        self.username = username
        self.password = password
        self.answer_key = answer_key
        self.id = concentrator_id
        self.meters_per_message = meters_per_message
        self.host = host
        self.port = port
        self.clock = clock
        self.interval = interval
        self.firmware = firmware
        self.faults = faults or ConcentratorFaults()
        self.protocol = protocol
        t0 = clock.now()
        self.loads = {m: LoadModel(t0=t0, seed=i + 1) for i, m in enumerate(meters)}
        self.seq = -1
        self.bdseq = -1
        self.sent: dict[int, Data] = {}
        self.commands: list[tuple[str, Command]] = []
        #: Per meter event log: (time, IDIS standard event code), oldest first.
        self.events: dict[str, list[tuple[datetime, int]]] = {m: [] for m in meters}
        start = datetime.fromtimestamp(t0, UTC)
        # With a backlog the first publish_until() sends that much recorded history at once.
        self.published_until = _EPOCH + ((start - _EPOCH) // interval) * interval - backlog
        self._client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._held: Data | None = None
        self._encoded: dict[int, str] = {}
        self.ready = asyncio.Event()

    # -- connection ------------------------------------------------------------------

    def _state(self, status: str) -> str:
        return State(
            status=status,  # type: ignore[arg-type]
            bdseq=self.bdseq,
            firmware=self.firmware if status == "online" else None,
            seq=self.seq if status == "online" else None,
            meters=[InventoryMeter(id=m, serial=f"SN{i + 1:08d}") for i, m in enumerate(self.loads)]
            if status == "online"
            else [],
            ts=self.clock.datetime(),
        ).model_dump_json()

    async def start(self) -> None:
        self.bdseq += 1
        will = aiomqtt.Will(state_topic(self.id), self._state("offline"), qos=1, retain=True)
        self._client = aiomqtt.Client(
            self.host, self.port, identifier=f"dc-{self.id}", will=will, protocol=self.protocol, keepalive=5,
            tls_context=self.tls, username=self.username, password=self.password,
        )
        await self._client.__aenter__()
        await self._client.subscribe(command_topic(self.id, "+"), qos=1)
        await self._client.publish(state_topic(self.id), self._state("online"), qos=1, retain=True)
        self._task = asyncio.create_task(self._serve_commands(self._client), name=f"dc-{self.id}-commands")
        self.ready.set()

    async def stop(self) -> None:
        """Clean shutdown: say offline, then disconnect."""
        if self._client is None:
            return
        with contextlib.suppress(aiomqtt.MqttError):
            await self._client.publish(state_topic(self.id), self._state("offline"), qos=1, retain=True)
        await self._close(clean=True)

    async def crash(self) -> None:
        """Drop off the network without DISCONNECT: the broker publishes the Last Will."""
        if self._client is None:
            return
        sock = self._client._client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # the TCP connection ends; no DISCONNECT was sent
        await self._close(clean=False)

    async def _close(self, *, clean: bool) -> None:
        client, self._client = self._client, None
        self.ready.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task
            self._task = None
        if client is not None:
            with contextlib.suppress(aiomqtt.MqttError, OSError):
                await client.__aexit__(None, None, None)

    # -- data ------------------------------------------------------------------------

    def _now(self) -> datetime:
        return self.clock.datetime() + timedelta(seconds=self.faults.clock_drift_s)

    def _interval_point(self, meter: str, end: datetime) -> Point:
        load = self.loads[meter]
        t_end = end.timestamp()
        kwh = load.import_kwh(t_end) - load.import_kwh(t_end - self.interval.total_seconds())
        raw = round(kwh * 1000)
        stamp = end + timedelta(seconds=self.faults.clock_drift_s)
        return Point(t=stamp, v=raw / 1000, raw=raw, scaler=-3)

    def _frozen(self, meter: str, midnight: datetime) -> Block:
        """The import register each meter froze at midnight, as a concentrator sends it daily."""
        wh = round(self.loads[meter].import_kwh(midnight.timestamp()) * 1000)
        stamp = midnight + timedelta(seconds=self.faults.clock_drift_s)
        return Block(meter=meter, kind="register", channel=IMPORT_ENERGY, unit="kWh",
                     readings=[Point(t=stamp, v=wh / 1000, raw=wh, scaler=-3)])  # fmt: skip

    def _block(self, meter: str, ends: list[datetime]) -> Block:
        return Block(
            meter=meter,
            kind="interval",
            channel=IMPORT_INTERVAL,
            unit="kWh",
            interval_s=int(self.interval.total_seconds()),
            readings=[self._interval_point(meter, end) for end in ends],
        )

    def _next(self, blocks: list[Block]) -> Data:
        self.seq += 1
        data = Data(seq=self.seq, blocks=blocks)
        self.sent[self.seq] = data
        return data

    def make_until(self, t: datetime, *, encode: bool = False) -> list[Data]:
        """The messages of every interval that ended by `t`, one per interval (and per
        `meters_per_message` meters), numbered and kept for backfill but not yet published;
        `encode`: their JSON made now too (a recorded backlog, ready to go out at once)."""
        made = []
        meters = list(self.loads)
        while self.published_until + self.interval <= t:
            end = self.published_until + self.interval
            for i in range(0, len(meters), self.meters_per_message):
                group = meters[i : i + self.meters_per_message]
                blocks = [self._block(m, [end]) for m in group]
                if end.hour == 0 and end.minute == 0:
                    blocks += [self._frozen(m, end) for m in group]  # each meter's register frozen at midnight
                made.append(self._next(blocks))
                if encode:
                    self._encoded[made[-1].seq] = made[-1].model_dump_json()
            self.published_until = end
        return made

    async def publish_made(self, made: list[Data]) -> int:
        for data in made:
            await self._publish_live(data)
        if self._held is not None:
            held, self._held = self._held, None
            await self._publish(held)
        return len(made)

    async def publish_until(self, t: datetime) -> int:
        """Publish every interval that ended by `t` (see `make_until`); returns how many
        messages were made."""
        return await self.publish_made(self.make_until(t))

    async def _publish_live(self, data: Data) -> None:
        if data.seq in self.faults.drop_seqs:
            return
        if self.faults.out_of_order and self._held is None:
            self._held = data
            return
        await self._publish(data)
        if self._held is not None:
            held, self._held = self._held, None
            await self._publish(held)

    async def _publish(self, data: Data) -> None:
        """Publish, or keep it buffered (in `sent`) while the broker is away, as a real DC does."""
        if self._client is None:
            return
        payload = self._encoded.pop(data.seq, None) or data.model_dump_json()
        try:
            await self._client.publish(data_topic(self.id), payload, qos=1)
            if self.faults.duplicate:
                await self._client.publish(data_topic(self.id), payload, qos=1)
        except aiomqtt.MqttError as exc:
            log.warning("%s: broker gone (%s); seq %d stays buffered for backfill", self.id, exc, data.seq)
            await self._close(clean=False)

    # -- commands --------------------------------------------------------------------

    async def _serve_commands(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            name = str(message.topic).rsplit("/", 1)[-1]
            try:
                command = Command.model_validate_json(message.payload)  # type: ignore[arg-type]
            except ValueError:
                log.warning("%s: unreadable command on %s", self.id, message.topic)
                continue
            self.commands.append((name, command))
            if self.faults.ignore_commands:
                continue
            response = await self._answer(name, command)
            if name == "relay" and self.faults.mute_relay_answers:
                continue
            if self.faults.answer_delay:
                await asyncio.sleep(self.faults.answer_delay)  # a slow PLC round trip
            if self.answer_key is not None:
                response = response.model_copy(update={"mac": response.mac_with(self.id, self.answer_key)})
            props = None
            if self.protocol == aiomqtt.ProtocolVersion.V5:
                props = Properties(PacketTypes.PUBLISH)
                props.CorrelationData = command.correlation_id.encode()
            await client.publish(command.reply_to, response.model_dump_json(), qos=1, properties=props)

    def _interval_ends(self, start: datetime, end: datetime) -> list[datetime]:
        """Interval ends in (start, end] that the meter has recorded."""
        end = min(end, self.published_until)
        b = _EPOCH + ((start - _EPOCH) // self.interval + 1) * self.interval
        ends = []
        while b <= end:
            ends.append(b)
            b += self.interval
        return ends

    async def _answer(self, name: str, c: Command) -> Response:
        def ok(**result: Any) -> Response:
            return Response(correlation_id=c.correlation_id, meter=c.meter, command=name, status="ok", result=result)

        def error(code: str, message: str) -> Response:
            return Response(correlation_id=c.correlation_id, meter=c.meter, command=name, status="error", error=code,
                            message=message)  # fmt: skip

        if name == "backfill" and "seq_from" in c.args:
            first, last = int(c.args["seq_from"]), int(c.args.get("seq_to", c.args["seq_from"]))
            republished = 0
            for seq in range(first, last + 1):
                if seq in self.sent:
                    await self._publish(self.sent[seq].model_copy(update={"replay": True}))
                    republished += 1
            return ok(published=republished)
        if c.meter not in self.loads:
            return error("unknown_meter", f"no meter {c.meter!r} behind {self.id}")
        load = self.loads[c.meter]
        now = self.clock.now()
        if name == "read":
            readings = []
            for code in c.args.get("channels", []):
                obis = Obis.parse(code)
                if obis != IMPORT_ENERGY and obis not in {Obis(1, 0, 16, 7, 0), Obis(1, 0, 32, 7, 0)}:
                    return error("unsupported", f"{c.meter} does not report {obis}")
                unit = "kWh" if obis == IMPORT_ENERGY else ("W" if obis.c == 16 else "V")
                point = Point(t=self._now(), v=load.value(obis, now))
                readings.append({"channel": str(obis), "unit": unit, "point": point.model_dump(mode="json")})
            return ok(readings=readings)
        if name in ("profile", "backfill"):
            ends = self._interval_ends(datetime.fromisoformat(c.args["start"]), datetime.fromisoformat(c.args["end"]))
            if name == "backfill":  # a time range: published as a new data message
                if ends:
                    await self._publish(self._next([self._block(c.meter, ends)]))
                return ok(published=1 if ends else 0, intervals=len(ends))
            points = [self._interval_point(c.meter, end).model_dump(mode="json") for end in ends]
            return ok(channel=str(IMPORT_INTERVAL), unit="kWh", points=points)
        if name == "clock":
            return ok(time=self._now().isoformat())
        if name == "events":
            start, end = datetime.fromisoformat(c.args["start"]), datetime.fromisoformat(c.args["end"])
            events = [{"t": t.isoformat(), "code": code} for t, code in self.events[c.meter] if start < t <= end]
            return ok(events=events)
        if name == "clock_sync":
            drift = self.faults.clock_drift_s
            before = self._now().replace(microsecond=0)
            self.events[c.meter] += [(before, 4), (self.clock.datetime().replace(microsecond=0), 5)]
            self.faults.clock_drift_s = 0.0
            return ok(drift_s=drift)
        if name in ("relay", "relay_state"):
            if name == "relay":
                action = c.args.get("action")
                if action not in ("disconnect", "reconnect"):
                    return error("bad_request", f"relay action must be disconnect or reconnect, not {action!r}")
                if c.meter not in self.faults.stuck_relays:
                    load.set_relay(action == "reconnect", now)
            state = RelayState.CONNECTED if load.relay_connected else RelayState.DISCONNECTED
            return ok(state=state.value)
        return error("unsupported", f"unknown command {name!r}")


def _write_whole(path: Path, text: str) -> None:
    """Written under another name and renamed: a reader never sees half of it."""
    part = path.with_suffix(".part")
    part.write_text(text)
    part.replace(path)


async def _main(args: argparse.Namespace) -> None:
    host, _, port = args.broker.rpartition(":")
    # The concentrators' clock is the wall clock from the start: a backlog is history they
    # recorded before, published at once, never a clock that stands still.
    clock = Clock()
    backlog = timedelta(days=args.backlog_days)
    fleet = [
        SimulatedConcentrator(
            f"dc-{k:03d}",
            host or "127.0.0.1",
            int(port),
            [f"dc-{k:03d}-m{n:04d}" for n in range(args.meters)],
            clock,
            interval=timedelta(seconds=args.interval),
            backlog=backlog,
        )
        for k in range(args.concentrators)
    ]
    for dc in fleet:
        await dc.start()
    print(f"{len(fleet)} concentrators x {args.meters} meters on {args.broker}", flush=True)
    if backlog:
        await asyncio.sleep(args.start_delay)
        # History a concentrator recorded is in its memory before it goes out: made first.
        now = clock.datetime()
        # In a thread: the clients' keepalives go on meanwhile.
        made = await asyncio.to_thread(lambda: [dc.make_until(now, encode=True) for dc in fleet])
        print(f"backlog of {sum(map(len, made))} messages made; publishing", flush=True)
        await asyncio.gather(*(dc.publish_made(m) for dc, m in zip(fleet, made, strict=True)))
        print(f"published {sum(dc.seq + 1 for dc in fleet)} messages of backlog", flush=True)
        if args.summary:
            # What went out, for a benchmark to check the store against: per meter, the
            # interval values and the sum of their raw numbers (exact integers).
            tally: dict[str, list[int]] = {}
            for data in (d for m in made for d in m):
                for block in data.blocks:
                    if block.kind == "interval":
                        counts = tally.setdefault(block.meter, [0, 0])
                        counts[0] += len(block.readings)
                        counts[1] += sum(int(p.raw or 0) for p in block.readings)
            values = sum(len(b.readings) for m in made for d in m for b in d.blocks)
            times = [p.t for m in made for d in m for b in d.blocks if b.kind == "interval" for p in b.readings]
            summary = json.dumps({"values": values, "intervals": tally, "first": min(times).isoformat(),
                                  "last": max(times).isoformat()})  # fmt: skip
            await asyncio.to_thread(_write_whole, Path(args.summary), summary)
    while True:
        for dc in fleet:
            await dc.publish_until(clock.datetime())
        await asyncio.sleep(1)  # the wall-clock tick of a running simulator


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", default="127.0.0.1:1883")
    p.add_argument("--concentrators", type=int, default=1)
    p.add_argument("--meters", type=int, default=10)
    p.add_argument("--interval", type=int, default=900, help="seconds per interval")
    p.add_argument("--backlog-days", type=float, default=0, help="publish this many past days at once first")
    p.add_argument("--start-delay", type=float, default=1.0, help="seconds between birth and the backlog")
    p.add_argument("--summary", help="write what the backlog held (values, per meter counts and raw sums) here")
    asyncio.run(_main(p.parse_args()))


if __name__ == "__main__":
    main()
