"""Topics and payloads between the head-end and MQTT data concentrators (see docs/mqtt.md).

Shared by the head-end's concentrator link and the concentrator simulator, so both speak
exactly one documented scheme. Payloads are JSON, validated with pydantic on arrival.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from headend.config import ObisCode

ROOT = "headend/v1"
#: Sequence numbers above this are refused at the schema: they could not be stored (SQLite
#: integers) nor counted on (JSON numbers), and one would poison the whole link.
MAX_SEQ = 2**53 - 1


def state_topic(concentrator: str) -> str:
    return f"{ROOT}/dc/{concentrator}/state"


def data_topic(concentrator: str) -> str:
    return f"{ROOT}/dc/{concentrator}/data"


def command_topic(concentrator: str, command: str) -> str:
    return f"{ROOT}/dc/{concentrator}/cmd/{command}"


def response_topic(concentrator: str) -> str:
    """Where a concentrator answers commands: under its own topics, so a broker ACL can let
    only that concentrator publish there (an answer is trusted only from the device asked)."""
    return f"{ROOT}/dc/{concentrator}/resp"


STATE_FILTER = f"{ROOT}/dc/+/state"
DATA_FILTER = f"{ROOT}/dc/+/data"
RESPONSE_FILTER = f"{ROOT}/dc/+/resp"
COMMAND_NAMES = ("read", "profile", "backfill", "events", "clock", "clock_sync", "relay", "relay_state")


def concentrator_of(topic: str) -> str:
    parts = topic.split("/")
    if len(parts) < 5 or "/".join(parts[:2]) != ROOT or parts[2] != "dc":
        raise ValueError(f"topic {topic!r} is not under {ROOT}/dc/<concentrator>/")
    return parts[3]


def _plausible(t: datetime) -> datetime:
    """A time a reading can have: with an offset, 1970..2200 (a year 9999 with -23:59 would
    not even convert to UTC)."""
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError("a time needs its UTC offset")
    if not EARLIEST <= t <= LATEST:
        raise ValueError(f"{t.isoformat()} is outside {EARLIEST.year}..{LATEST.year}")
    return t


def _at_most_microseconds(value: object) -> object:
    """More digits would be truncated here and rounded by the lean decoder: one interval
    could become two points. Refused in both."""
    if isinstance(value, str) and re.search(r"\d\d:\d\d:\d\d\.\d{7}", value):
        raise ValueError("a time with more than 6 decimals of a second (at most microseconds)")
    return value


#: The times a reading may carry.
EARLIEST, LATEST = datetime(1970, 1, 1, tzinfo=UTC), datetime(2200, 1, 1, tzinfo=UTC)
Stamp = Annotated[datetime, BeforeValidator(_at_most_microseconds), AfterValidator(_plausible)]


class Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: Every text a message carries is short: a long one is copied into each reading (and row) it
#: touches, so one 4 MiB message could otherwise cost gigabytes and minutes.
Name = Annotated[str, Field(max_length=64)]
Text = Annotated[str, Field(max_length=500)]
#: Points one data message may carry in all its blocks (a day of 1,000 meters' quarter
#: hours is 96,000; send more in several messages).
MAX_POINTS = 100_000


class InventoryMeter(Payload):
    id: Name
    serial: Name | None = None
    model: Name | None = None
    address: Name | None = None


class State(Payload):
    """Birth (online, retained, with inventory) and death (offline, the Last Will)."""

    status: Literal["online", "offline"]
    #: Birth/death sequence: bumps on every (re)connect; a death with an older bdSeq is stale.
    bdseq: int = Field(ge=0, le=MAX_SEQ)
    firmware: Name | None = None
    #: The last data `seq` published before this birth (gap detection across reconnects).
    seq: int | None = Field(default=None, ge=-1, le=MAX_SEQ)
    meters: list[InventoryMeter] = Field(default=[], max_length=100_000)
    ts: Stamp | None = None




class Point(Payload):
    t: Stamp
    v: float | None
    q: list[Annotated[str, Field(max_length=16)]] = Field(default=[], max_length=8)
    raw: float | None = None
    scaler: int = 0


class Block(Payload):
    """The reads of one channel of one meter: an interval block or a register snapshot."""

    meter: Name
    kind: Literal["interval", "register", "event"]
    channel: ObisCode
    unit: Annotated[str, Field(max_length=16)] = ""
    interval_s: int | None = Field(default=None, gt=0)
    readings: list[Point] = Field(min_length=1, max_length=10_000)


class Data(Payload):
    """One data message, numbered per concentrator: blocks of one or many meters."""

    seq: int = Field(ge=0, le=MAX_SEQ)
    blocks: list[Block] = Field(min_length=1, max_length=10_000)
    replay: bool = False

    @model_validator(mode="after")
    def _bounded(self) -> Data:
        points = sum(len(b.readings) for b in self.blocks)
        if points > MAX_POINTS:
            raise ValueError(f"{points} points in one message; at most {MAX_POINTS}")
        return self


class Command(Payload):
    """Head-end -> concentrator. Correlation and reply topic also travel in the payload so a
    v3.1.1 session (no MQTT 5 properties) can answer too."""

    correlation_id: Name
    reply_to: Annotated[str, Field(max_length=200)]
    meter: Name | None = None
    args: dict[str, Any] = {}


class Response(Payload):
    correlation_id: Name
    #: The command's meter and name, echoed: an answer is matched on all three.
    meter: Name | None = None
    command: Name | None = None
    status: Literal["ok", "error"]
    #: On error: unknown_meter, meter_timeout, refused, unsupported, bad_request.
    error: Name | None = None
    message: Text | None = None
    result: dict[str, Any] = {}
    #: HMAC-SHA256 (hex) of `signed_text()` with the concentrator's answer key, if it has one.
    mac: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None

    def signed_text(self, concentrator: str) -> bytes:
        """What the MAC covers: the answer and whose it is, in one canonical JSON text."""
        fields = [concentrator, self.correlation_id, self.meter, self.command, self.status, self.error, self.message,
                  self.result]  # fmt: skip
        return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    def mac_with(self, concentrator: str, key: bytes) -> str:
        return hmac.new(key, self.signed_text(concentrator), hashlib.sha256).hexdigest()
