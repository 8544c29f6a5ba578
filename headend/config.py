"""The TOML configuration, loaded into pydantic models.

Everything is checked before anything starts; a bad config raises `ConfigError`, whose
message names the file, the key path (`meters[2].ct.primary (id "M-3")`) and the reason,
one line per problem, all problems at once.
"""

from __future__ import annotations

import json
import re
import ssl
import tomllib
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from headend.model import Obis, parse_obis, validate_meter_id

# --------------------------------------------------------------------------- errors


class ConfigError(Exception):
    """A config that must not be started. `problems` holds (key path, reason) pairs."""

    def __init__(self, file: str | Path, problems: Sequence[tuple[str, str]]) -> None:
        self.file = str(file)
        self.problems = list(problems)
        lines = [f"{self.file}: {path}: {reason}" if path else f"{self.file}: {reason}" for path, reason in problems]
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------- field types

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: object) -> timedelta:
    """`"15m"`, `"1h30m"`, `"500ms"`, or a number of seconds."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as '15m' or '30s', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        pos, seconds = 0, 0.0
        for match in _DURATION_PART.finditer(text):
            if match.start() != pos:
                break
            seconds += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
            pos = match.end()
        if not text or pos != len(text):
            raise ValueError(f"{value!r} is not a duration; use forms like '90s', '15m', '1h30m', '500ms'")
    else:
        raise ValueError(f"expected a duration such as '15m' or '30s', got {type(value).__name__}")
    if seconds < 0:
        raise ValueError(f"duration must not be negative, got {value!r}")
    return timedelta(seconds=seconds)


def _format_duration(value: timedelta) -> str:
    return f"{value.total_seconds():g}s"


def _parse_obis(value: object) -> Obis:
    if isinstance(value, Obis):
        return value
    if isinstance(value, str):
        return parse_obis(value)
    return Obis.parse(value)  # type: ignore[arg-type]


Duration = Annotated[timedelta, BeforeValidator(parse_duration), PlainSerializer(_format_duration)]
ObisCode = Annotated[Obis, BeforeValidator(_parse_obis), PlainSerializer(str)]
MeterIdStr = Annotated[str, BeforeValidator(validate_meter_id)]
Identifier = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")]
Port = Annotated[int, Field(ge=1, le=65535)]
Positive = Annotated[float, Field(gt=0)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- storage


class SqliteStoreConfig(Strict):
    path: Path = Path("var/readings.sqlite")


class InfluxConfig(Strict):
    url: str = "http://127.0.0.1:8086"
    database: str = "headend"
    api: Literal["v1", "v2"] = "v1"
    username: str | None = None
    #: Secrets come from the environment, never from the file: these name the variables.
    password_env: str | None = None
    token_env: str | None = None
    org: str | None = None
    bucket: str | None = None
    timeout: Duration = timedelta(seconds=10)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http(s) URL such as 'http://127.0.0.1:8086'")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as exc:
            raise ValueError(f"{value!r}: {exc}") from None
        return value.rstrip("/")

    @model_validator(mode="after")
    def _v2_needs_token(self) -> InfluxConfig:
        if self.api == "v2":
            missing = [k for k in ("token_env", "org", "bucket") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"api = 'v2' needs {', '.join(missing)}")
        return self


class WriterConfig(Strict):
    batch_size: int = Field(5000, ge=1, le=100_000)
    #: After a batch smaller than batch_size, wait this long for more (one store request per
    #: few thousand values rather than per message); at most this much latency added.
    linger: Duration = timedelta(milliseconds=50)
    #: Batches on their way to the store at once (the next is formatted while the store works).
    in_flight: int = Field(2, ge=1, le=8)
    max_backoff: Duration = timedelta(seconds=30)
    #: Outbox depth above which the writer logs a warning (the store is not keeping up).
    warn_depth: int = Field(1_000_000, ge=1)
    #: `headend serve` drains the outbox in a process of its own, so formatting and posting
    #: batches use the second core (concentrator ingest: ~25 % more values per second).
    own_process: bool = True


class StorageConfig(Strict):
    backend: Literal["sqlite", "influx"] = "sqlite"
    outbox: Path = Path("var/outbox.sqlite")
    sqlite: SqliteStoreConfig = SqliteStoreConfig()
    influx: InfluxConfig | None = None
    writer: WriterConfig = WriterConfig()

    @model_validator(mode="after")
    def _backend_configured(self) -> StorageConfig:
        if self.backend == "influx" and self.influx is None:
            raise ValueError("backend = 'influx' needs a [storage.influx] section")
        return self


# --------------------------------------------------------------------------- links

BAUD_RATES = (300, 600, 1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200)


class TcpLink(Strict):
    kind: Literal["tcp"]
    id: Identifier
    protocol: Literal["dlms-wrapper", "dlms-hdlc", "modbus-tcp"]
    host: str
    port: Port
    max_sessions: int = Field(1, ge=1, le=1000)
    timeout: Duration = timedelta(seconds=10)
    #: A whole DLMS session (association to release) on this link may take this long at most.
    session_deadline: Duration = timedelta(minutes=10)
    #: DLMS: pass over (log and count) bytes after a GET answer's value instead of failing the
    #: read; for meters known to send them (docs/dlms.md). Strict by default.
    dlms_lenient: bool = False


class SerialLink(Strict):
    kind: Literal["serial"]
    id: Identifier
    protocol: Literal["dlms-hdlc", "modbus-rtu"]
    device: str
    baudrate: int = 9600
    parity: Literal["N", "E", "O"] = "N"
    bytesize: Literal[7, 8] = 8
    stopbits: Literal[1, 2] = 1
    timeout: Duration = timedelta(seconds=5)
    #: A whole DLMS session (association to release) on this line may take this long at most.
    session_deadline: Duration = timedelta(minutes=10)
    #: DLMS: pass over (log and count) bytes after a GET answer's value (see TcpLink).
    dlms_lenient: bool = False

    @field_validator("baudrate")
    @classmethod
    def _baud(cls, value: int) -> int:
        if value not in BAUD_RATES:
            raise ValueError(f"{value} is not a standard baud rate; use one of {', '.join(map(str, BAUD_RATES))}")
        return value


class MqttLink(Strict):
    kind: Literal["mqtt"]
    id: Identifier
    protocol: Literal["mqtt"] = "mqtt"
    host: str
    port: Port = 1883
    username: str | None = None
    password_env: str | None = None
    #: TLS to the broker (port 8883 by convention); `ca_file` trusts a private CA's PEM.
    tls: bool = False
    ca_file: Path | None = None
    timeout: Duration = timedelta(seconds=30)
    #: A data seq further than this past the highest seen is quarantined, not taken for a gap.
    max_seq_gap: int = Field(10_000, ge=1, le=10_000_000)
    #: The head-end's MQTT client id; default "headend-<installation id>" (state_dir), unique
    #: per installation so two head-ends never take each other's persistent session.
    client_id: str | None = Field(None, min_length=1, max_length=200)

    @model_validator(mode="after")
    def _ca(self) -> MqttLink:
        if self.ca_file is not None and not self.tls:
            raise ValueError("ca_file is set but tls = false; set tls = true or drop ca_file")
        if self.ca_file is not None and not self.ca_file.is_file():
            raise ValueError(f"ca_file {str(self.ca_file)!r} is not a readable file")
        return self

    def tls_context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=self.ca_file) if self.tls else None


Link = Annotated[TcpLink | SerialLink | MqttLink, Field(discriminator="kind")]


class Concentrator(Strict):
    id: Identifier
    link: str
    max_sessions: int = Field(4, ge=1, le=1000)
    site: str | None = None
    #: Environment variable holding this concentrator's answer key (hex, 16 bytes or more):
    #: its answers must then carry an HMAC-SHA256 made with it, so no other client on the
    #: broker can answer for it, ACL or not.
    answer_key_env: str | None = None


# --------------------------------------------------------------------------- meters


class ProtectionCategory(StrEnum):
    """Customers that must never be cut off automatically."""

    HOSPITAL = "hospital"
    WATER = "water"
    GAS = "gas"
    RAIL = "rail"
    MILITARY = "military"
    LIFE_SUPPORT = "life_support"
    EMERGENCY = "emergency"
    OTHER = "other"


class Ratio(Strict):
    primary: Positive
    secondary: Positive

    @property
    def factor(self) -> float:
        return self.primary / self.secondary


class DlmsSettings(Strict):
    """How to associate with a DLMS meter. The LLS password comes from the environment."""

    authentication: Literal["none", "lls", "hls-gmac"] = "none"
    password_env: str | None = None
    #: HLS-GMAC global keys (AES-128, hex) are read from these environment variables.
    encryption_key_env: str | None = None
    authentication_key_env: str | None = None
    client_sap: int | None = Field(None, ge=1, le=127)
    logical: int = Field(1, ge=0, le=127)
    #: HDLC lower (physical) address; None for the TCP wrapper or a one-meter HDLC link.
    physical: int | None = Field(None, ge=0, le=16383)  # above 127: a four-byte HDLC address
    server_sap: int = Field(1, ge=0, le=0xFFFF)

    @model_validator(mode="after")
    def _password(self) -> DlmsSettings:
        if self.authentication == "lls" and self.password_env is None:
            raise ValueError("authentication = 'lls' needs password_env (the variable holding the password)")
        if self.authentication == "hls-gmac" and (
            self.encryption_key_env is None or self.authentication_key_env is None
        ):
            raise ValueError("authentication = 'hls-gmac' needs encryption_key_env and authentication_key_env")
        return self


class Meter(Strict):
    id: MeterIdStr
    #: A meter hangs off exactly one of: a link (direct) or a concentrator.
    link: str | None = None
    concentrator: str | None = None
    #: Protocol address: DLMS HDLC server address, Modbus unit id, or the concentrator's meter id.
    address: int | str | None = None
    serial: str | None = None
    model: str | None = None
    #: Modbus register map: a name from config/meters/ (e.g. "eastron-sdm630") or a path to a map file.
    map: str | None = None
    dlms: DlmsSettings | None = None
    customer: str | None = None
    groups: list[Identifier] = []
    ct: Ratio | None = None
    pt: Ratio | None = None
    protected: bool = False
    protection: ProtectionCategory | None = None
    #: The energy register's integer digits (its dials) and resolution in kWh, on the meter's
    #: own (secondary) side: it rolls over at 10**register_digits; VEE uses both.
    register_digits: int = Field(8, ge=3, le=12)
    register_resolution: Positive = 0.01

    @model_validator(mode="after")
    def _attachment_and_protection(self) -> Meter:
        if (self.link is None) == (self.concentrator is None):
            raise ValueError("set exactly one of 'link' or 'concentrator'")
        if self.protected and self.protection is None:
            raise ValueError(
                "protected = true needs 'protection' (one of "
                + ", ".join(c.value for c in ProtectionCategory)
                + ") so operators see why"
            )
        if self.protection is not None and not self.protected:
            raise ValueError("'protection' is set but protected = false; set protected = true or drop it")
        return self

    @property
    def multiplier(self) -> float:
        """CT ratio times PT ratio: what the meter's secondary-side value is multiplied by."""
        return (self.ct.factor if self.ct else 1.0) * (self.pt.factor if self.pt else 1.0)


# --------------------------------------------------------------------------- plans


class Selector(Strict):
    group: str | None = None
    link: str | None = None
    protocol: str | None = None
    meters: list[MeterIdStr] | None = None


class Plan(Strict):
    id: Identifier
    select: Selector = Selector()
    #: billing: the meter's frozen billing-period registers (daily and monthly billing profiles).
    read: list[Literal["profile", "registers", "events", "clock", "billing"]] = Field(min_length=1)
    channels: list[ObisCode] = []
    profile: ObisCode = Obis(1, 0, 99, 1, 0)
    every: Duration | None = None
    cron: str | None = None
    window: Duration = timedelta(minutes=10)
    deadline: Duration | None = None
    #: The profile's capture period: what completeness is counted in.
    interval: Duration = timedelta(minutes=15)
    #: How far back a first read (or a gap re-read) goes: the meter's buffer depth.
    history: Duration = timedelta(days=7)
    #: Clock drift above this is synced (if sync_clock) and the intervals read are flagged.
    clock_tolerance: Duration = timedelta(seconds=30)
    sync_clock: bool = True
    attempts: int = Field(3, ge=1, le=10)

    @model_validator(mode="after")
    def _when(self) -> Plan:
        if (self.every is None) == (self.cron is None):
            raise ValueError("set exactly one of 'every' or 'cron'")
        if self.every is not None and self.every < timedelta(seconds=1):
            raise ValueError("'every' must be at least 1s")
        if "registers" in self.read and not self.channels:
            raise ValueError("read includes 'registers' but 'channels' is empty")
        return self

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                # Standard cron (cronsim): an expression that can never fire (30 February) is refused here.
                next(CronSim(value, datetime(2026, 1, 1, tzinfo=UTC)))
            except (CronSimError, StopIteration) as exc:
                raise ValueError(f"cron {value!r}: {exc or 'never fires'}") from None
        return value


_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HHMM = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"


class SwitchWindow(Strict):
    """Days (e.g. "mon-fri" or "mon,wed") and local hours in which disconnects may run."""

    days: str = "mon-fri"
    start: Annotated[str, Field(pattern=_HHMM)] = "08:00"
    end: Annotated[str, Field(pattern=_HHMM)] = "15:00"

    @field_validator("days")
    @classmethod
    def _days(cls, value: str) -> str:
        for part in value.lower().split(","):
            for day in part.split("-"):
                if day.strip() not in _WEEKDAYS:
                    raise ValueError(f"{day.strip()!r} is not a weekday; use mon..sun, ranges like mon-fri")
        return value.lower()

    def weekdays(self) -> set[int]:
        out: set[int] = set()
        for part in self.days.split(","):
            first, _, last = part.strip().partition("-")
            a, b = _WEEKDAYS.index(first.strip()), _WEEKDAYS.index((last or first).strip())
            out.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
        return out


def known_timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{value!r} is not a known time zone (IANA name such as 'Europe/Berlin')") from None
    return value


class SwitchingConfig(Strict):
    timezone: str = "UTC"
    #: Disconnects only inside these windows (so a customer can still pay and be back the same day).
    disconnect_windows: list[SwitchWindow] = [SwitchWindow()]
    holidays: list[date] = []
    confirm_timeout: Duration = timedelta(seconds=60)
    #: A command still queued this long after the request expires instead of running late.
    deadline: Duration = timedelta(hours=1)
    poll_interval: Duration = timedelta(seconds=2)
    attempts: int = Field(3, ge=1, le=10)
    dry_run: bool = False
    #: Disconnects started per link and minute, at most (bulk runs are paced, reconnects never).
    disconnects_per_link_per_minute: int = Field(60, ge=1, le=100_000)
    #: A disconnect requested outside the windows waits (deferred) for the next opening, if
    #: that is at most this far off; later than that it is refused.
    max_defer: Duration = timedelta(days=4)
    #: Two-person rule: a protected customer's disconnect (with override) waits until a second
    #: principal holding the override role approves it.
    protected_approval: bool = False
    #: Runners for disconnects and, apart, for reconnects (a stuck disconnect never holds up a reconnect).
    workers: int = Field(8, ge=1, le=1000)
    reconnect_workers: int = Field(4, ge=1, le=1000)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        return known_timezone(value)


class ApiConfig(Strict):
    host: str = "127.0.0.1"
    port: Port = 8080
    tokens_file: Path | None = None
    #: HTTPS: a PEM certificate (chain) and its private key. Without them the API speaks plain
    #: HTTP, which only belongs on loopback: bearer tokens would cross the network in clear.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Request bodies larger than this are refused (413) before they are read.
    max_body: int = Field(1_048_576, ge=1024, le=1_073_741_824)
    #: A client must send its request headers within this, and its body within `body_timeout`.
    header_timeout: Duration = timedelta(seconds=10)
    body_timeout: Duration = timedelta(seconds=30)
    #: Requests served at once; more get 503 at once instead of queueing without bound.
    max_concurrency: int = Field(200, ge=1, le=100_000)
    #: /metrics only with a valid token (for a Prometheus with a bearer token).
    metrics_auth: bool = False

    @model_validator(mode="after")
    def _tls(self) -> ApiConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set both tls_cert and tls_key, or neither")
        for name in ("tls_cert", "tls_key"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {str(path)!r} is not a readable file")
        return self


VEE_RULES = (
    "gap", "duplicate", "alignment", "clock", "negative_delta", "rollback", "sum_check", "spike",
    "high_low", "prolonged_zero", "after_disconnect", "multiplier",
)  # fmt: skip


class VeeConfig(Strict):
    """Validation, estimation and editing for billing (docs/vee.md)."""

    #: Rules that run; any of VEE_RULES.
    rules: list[str] = list(VEE_RULES)
    #: The billing interval: what completeness and alignment are counted in.
    interval: Duration = timedelta(minutes=15)
    #: Sum check: allowed |sum of intervals - register difference| per day is the larger of
    #: this many register digits (resolution x multiplier) and this share of the difference.
    sum_tolerance_digits: int = Field(2, ge=0)
    sum_tolerance_share: float = Field(0.005, ge=0, lt=1)
    #: Spike: a day's highest interval above this ratio times its third highest, and above
    #: `spike_min_kwh`.
    spike_ratio: float = Field(1.5, gt=1)
    spike_min_kwh: float = Field(1.0, ge=0)
    #: High/low: a day's total against the average of the same weekday in the last weeks.
    high_ratio: float = Field(2.0, gt=1)
    low_ratio: float = Field(0.5, gt=0, lt=1)
    like_day_weeks: int = Field(4, ge=1, le=12)
    #: Prolonged zero: this long without consumption on a meter that is not disconnected.
    zero_run: Duration = timedelta(hours=12)
    #: Consumption after a confirmed disconnect above this per interval is flagged.
    after_disconnect_kwh: float = Field(0.0, ge=0)
    #: Gaps up to this long are interpolated; longer ones get the like-day shape.
    interpolate_max: Duration = timedelta(hours=2)
    #: Longest period one request may ask for.
    max_period: Duration = timedelta(days=62)
    #: Validate what the writer stores as it arrives (and note replaced values as duplicates).
    on_arrival: bool = True
    #: A gap is asked of the meter again at most this many times (0: never), the n-th re-read
    #: no sooner than `reread_spacing` x 2^(n-2) after the one before: a real outage costs
    #: a few associations, not one per validation (GPRS money, meters that lock out).
    reread_attempts: int = Field(3, ge=0, le=20)
    reread_spacing: Duration = timedelta(minutes=15)
    #: How often the collection KPIs (each link's completeness of the last complete day, from
    #: the store, every protocol) are computed again.
    kpi_refresh: Duration = timedelta(minutes=15)
    #: Where a billing day starts and ends (day rules: spike, high/low, like days).
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        return known_timezone(value)

    @field_validator("rules")
    @classmethod
    def _known_rules(cls, rules: list[str]) -> list[str]:
        unknown = sorted(set(rules) - set(VEE_RULES))
        if unknown:
            raise ValueError(f"unknown rules {unknown}; known: {', '.join(VEE_RULES)}")
        return rules


class DlmsClientConfig(Strict):
    #: This head-end's DLMS system title (16 hex digits: 8 bytes, conventionally a 3-letter
    #: manufacturer id and a serial). Default: one made at random for this installation and
    #: kept in state_dir, so two head-ends sharing meter keys never reuse AES-GCM nonces.
    system_title: Annotated[str, Field(pattern=r"^[0-9A-Fa-f]{16}$")] | None = None
    #: What one GET may bring in blocks (a profile of 96 x 4 x 13 bytes is about 5 kB; a month
    #: of 15-minute rows about 150 kB): a meter that keeps sending past either cap gets its
    #: session closed with a clear error, and memory stays bounded whatever it sends.
    max_get_bytes: int = Field(16 * 1024 * 1024, ge=4096, le=1 << 30)
    max_get_blocks: int = Field(20_000, ge=1, le=10_000_000)


class Config(Strict):
    storage: StorageConfig = StorageConfig()
    dlms: DlmsClientConfig = DlmsClientConfig()
    vee: VeeConfig = VeeConfig()
    api: ApiConfig = ApiConfig()
    links: list[Link] = []
    concentrators: list[Concentrator] = []
    meters: list[Meter] = []
    plans: list[Plan] = []
    switching: SwitchingConfig = SwitchingConfig()
    #: Where the command journal and the DLMS invocation counters live.
    state_dir: Path = Path("var/state")


# --------------------------------------------------------------------------- loading

M = TypeVar("M", bound=BaseModel)


def _named(item_id: str) -> str:
    # JSON quoting shows control characters as escapes instead of printing them.
    return f" (id {json.dumps(item_id, ensure_ascii=False)})"


def _key_path(loc: Iterable[str | int], raw: Any) -> str:
    """Turn a pydantic location into `meters[2].ct.primary (id "M-3")`, naming list items by id.

    Location parts that are not in the raw data (a tagged union's tag) are dropped, except
    the last one, which is the missing key itself.
    """
    parts: list[str] = []
    node: Any = raw
    named = ""
    loc = list(loc)
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(part, int) and isinstance(node, list) and part < len(node):
            node = node[part]
            parts.append(f"[{part}]")
            if isinstance(node, dict) and isinstance(node.get("id"), str):
                named = _named(node["id"])
        elif isinstance(node, dict) and part in node:
            node = node[part]
            parts.append(f".{part}" if parts else str(part))
        elif last and not (isinstance(node, dict) and node.get("kind") == part):
            parts.append(f".{part}" if parts else str(part))
        # else: a union tag pydantic adds to the location (a check of the whole entry ends
        # there too); not a key the user wrote
    return "".join(parts) + named


def _pydantic_problems(exc: ValidationError, raw: Any) -> list[tuple[str, str]]:
    problems = []
    for err in exc.errors():
        reason = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            reason = "unknown key (misspelt, or not valid here)"
        loc = list(err["loc"])
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc.append(str(err.get("ctx", {}).get("discriminator", "kind")).strip("'"))
        problems.append((_key_path(loc, raw), reason))
    return problems


def _duplicates(items: Iterable[str]) -> list[str]:
    return [item for item, n in Counter(items).items() if n > 1]


def _reference_problems(cfg: Config) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for section, items in (
        ("links", cfg.links),
        ("concentrators", cfg.concentrators),
        ("meters", cfg.meters),
        ("plans", cfg.plans),
    ):
        for dup in _duplicates(item.id for item in items):
            idx = [i for i, item in enumerate(items) if item.id == dup]
            problems.append((f"{section}[{idx[-1]}]{_named(dup)}", f"duplicate id, first used at {section}[{idx[0]}]"))
    first_with: dict[str, int] = {}
    for i, meter in enumerate(cfg.meters):
        if meter.serial is None:
            continue
        if meter.serial in first_with:
            j = first_with[meter.serial]
            problems.append((f"meters[{i}]{_named(meter.id)}.serial",
                             f"serial {meter.serial!r} is also the serial of meter {cfg.meters[j].id!r} (meters[{j}]): "
                             "one of them is booked to the wrong customer"))  # fmt: skip
        else:
            first_with[meter.serial] = i
    links = {link.id: link for link in cfg.links}
    concentrators = {c.id for c in cfg.concentrators}
    groups = {g for m in cfg.meters for g in m.groups}
    meters = {m.id for m in cfg.meters}
    for i, conc in enumerate(cfg.concentrators):
        where = f"concentrators[{i}]{_named(conc.id)}.link"
        if conc.link not in links:
            problems.append((where, f"no link with id {conc.link!r}"))
        elif links[conc.link].kind != "mqtt":
            problems.append(
                (where, f"link {conc.link!r} is {links[conc.link].kind}; a concentrator needs an mqtt link")
            )
    for i, meter in enumerate(cfg.meters):
        where = f"meters[{i}]{_named(meter.id)}"
        if meter.link is not None:
            if meter.link not in links:
                problems.append((f"{where}.link", f"no link with id {meter.link!r}"))
            elif links[meter.link].kind == "mqtt":
                problems.append((f"{where}.link", "meters behind MQTT are attached with 'concentrator', not 'link'"))
        if meter.concentrator is not None and meter.concentrator not in concentrators:
            problems.append((f"{where}.concentrator", f"no concentrator with id {meter.concentrator!r}"))
        if meter.map is not None:
            problems.extend((f"{where}.map", reason) for reason in _map_problems(meter.map))
        elif meter.link in links and links[meter.link].protocol.startswith("modbus"):
            problems.append((f"{where}.map", "a meter on a Modbus link needs a register map (e.g. 'eastron-sdm630')"))
    for i, plan in enumerate(cfg.plans):
        where = f"plans[{i}]{_named(plan.id)}.select"
        sel = plan.select
        if sel.group is not None and sel.group not in groups:
            problems.append((f"{where}.group", f"no meter is in group {sel.group!r}"))
        if sel.link is not None and sel.link not in links and sel.link not in concentrators:
            problems.append((f"{where}.link", f"no link or concentrator with id {sel.link!r}"))
        for m in sel.meters or []:
            if m not in meters:
                problems.append((f"{where}.meters", f"no meter with id {m!r}"))
        if "profile" in plan.read and any(_boundary_read(m, links) and _selects(plan.select, m, links)
                                          for m in cfg.meters):  # fmt: skip
            reason = _boundary_cadence_problem(plan)
            if reason:
                problems.append((f"plans[{i}]{_named(plan.id)}.{'every' if plan.every else 'cron'}", reason))
    return problems


def _boundary_read(meter: Meter, links: dict[str, Link]) -> bool:
    """A meter without a load profile, whose intervals come from register reads at boundaries."""
    return meter.link in links and links[meter.link].protocol.startswith("modbus")  # type: ignore[union-attr]


def _selects(sel: Selector, meter: Meter, links: dict[str, Link]) -> bool:
    link = links.get(meter.link or "")
    return ((sel.meters is None or meter.id in sel.meters) and (sel.group is None or sel.group in meter.groups)
            and (sel.link is None or sel.link in (meter.link, meter.concentrator))
            and (sel.protocol is None or (link is not None and link.protocol == sel.protocol)))  # fmt: skip


def _boundary_cadence_problem(plan: Plan) -> str | None:
    """Why the plan's schedule cannot give a register read at each interval boundary (within
    the minute after it that counts), or None."""
    tolerance = min(timedelta(seconds=60), plan.interval / 10)
    minutes = int(plan.interval.total_seconds() // 60)
    why = (f"reads Modbus meters' intervals from register reads at each {minutes}-minute boundary (within "
           f"{tolerance.total_seconds():g} s after it), which this schedule never gives; use a divisor of "
           f"{minutes} minutes (e.g. every = \"{minutes}m\") or a cron firing at each boundary")
    if plan.every is not None:
        return None if plan.every <= tolerance or plan.interval % plan.every == timedelta(0) else why
    assert plan.cron is not None
    day = datetime(2026, 1, 5, tzinfo=UTC)  # a Monday: one day of fire times, every boundary of it
    fires = CronSim(plan.cron, day - timedelta(seconds=1))
    boundary, fire = day, next(fires)
    while boundary < day + timedelta(days=1):
        while fire < boundary:
            fire = next(fires)
        if fire - boundary > tolerance:
            return why
        boundary += plan.interval
    return None


def _map_problems(name: str) -> list[str]:
    from headend.protocols.modbus_maps import find_map  # maps build on this module

    try:
        find_map(name)
    except ConfigError as exc:
        return [f"register map {name!r}: {line}" for line in str(exc).splitlines()]
    return []


def parse_config(raw: dict[str, Any], file: str | Path = "<config>") -> Config:
    """Validate an already-parsed TOML document."""
    cfg = validate_model(Config, raw, file)
    problems = _reference_problems(cfg)
    if problems:
        raise ConfigError(file, problems)
    return cfg


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file or raise ConfigError naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, [("", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, [("", f"cannot read: {exc}")]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [("", f"not valid TOML: {exc}")]) from None


def validate_model(model: type[M], raw: dict[str, Any], file: str | Path) -> M:
    """Validate raw TOML data into `model`, turning pydantic errors into a ConfigError."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(file, _pydantic_problems(exc, raw)) from None


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML config file. Relative paths inside it stay relative to the CWD."""
    return parse_config(read_toml(path), path)
