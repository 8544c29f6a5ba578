"""DLMS/COSEM meter simulator over the TCP wrapper (IEC 62056-47) and HDLC (IEC 62056-46: a
bus of meters by physical address on a serial line or TCP), logical-name referencing.

Objects (one table, `CosemObject`, that GET, SET, ACTION and the object list come from):
the association 0-0:40.0.0.255 (class 15, its object list), Clock 0-0:1.0.0.255 (class 8),
energy and instantaneous registers (class 3) with scaler_unit, maximum demand (class 4), a
load profile 1-0:99.1.0.255 (class 7: clock, status, +A, -A, +R, -R at 15-minute intervals)
that fills as simulated time passes, the event log and daily and monthly billing profiles
(class 7, attributes 1-8, selective access by range and by entry), Disconnect Control
0-0:96.3.10.255 (class 70) whose relay follows control_mode (remote reconnect ends in
ready_for_reconnection in modes 1, 3, 5), the status word and event code, logical device
name, serial number, firmware and CT/PT ratios (class 1).

Associations: public client without security (reads only); LLS with the meter's password;
HLS-GMAC. Answers never exceed the client's max PDU (GET data blocks, at most `block_size`
bytes); on HDLC the frame sizes the client's SNRM proposed are kept.

Faults: response `delay`, `drop_after_bytes` (connection cut mid-answer), `corrupt`
(garbage frame), clock drift (`clock_offset_s`), `missing_intervals` (profile rows the meter
never recorded), `stuck_relay`, `endless_blocks` / `repeat_block_number` (a meter that never
stops talking), `trailing_bytes` (bytes after a value sent in blocks).

    python -m simulators.dlms_meter --meters 3 --port 4059    # meters on ports 4059, 4060, 4061
    python -m simulators.dlms_meter --meters 3 --hdlc-serial /dev/pts/7    # an RS-485 style HDLC bus
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import serial_asyncio_fast

from headend.model import Obis
from headend.protocols.dlms import axdr, codec, hdlc, xdlms
from headend.protocols.dlms.axdr import DateTime, Structure, Typed
from headend.protocols.dlms.hdlc_link import FrameReader, HdlcConnection, Received
from headend.protocols.dlms.security import Protection, ProtectionError, hls_check, hls_reply
from headend.protocols.dlms.wrapper import WrapperError, WrapperFrame, read_frame
from simulators.clock import Clock
from simulators.physics import LoadModel

log = logging.getLogger(__name__)

CLOCK = Obis(0, 0, 1, 0, 0)
CURRENT_ASSOCIATION = Obis(0, 0, 40, 0, 0)
# The simulator's global keys (AES-128, security suite 0): test keys, public on purpose.
DEFAULT_KEYS = codec.Keys(
    bytes.fromhex("000102030405060708090A0B0C0D0E0F"), bytes.fromhex("D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF")
)
PROFILE = Obis(1, 0, 99, 1, 0)
STATUS = Obis(0, 0, 96, 10, 1)
DISCONNECT = Obis(0, 0, 96, 3, 10)
SERIAL = Obis(0, 0, 96, 1, 0)
FIRMWARE = Obis(1, 0, 0, 2, 0)
LDN = Obis(0, 0, 42, 0, 0)
EVENT_LOG = Obis(0, 0, 99, 98, 0)  # standard event log (IDIS)
SAP_ASSIGNMENT = Obis(0, 0, 41, 0, 0)
# Transformer ratios (IEC 62056-61): current and voltage numerators and denominators.
CT_NUM, PT_NUM, CT_DEN, PT_DEN = Obis(1, 0, 0, 4, 2), Obis(1, 0, 0, 4, 3), Obis(1, 0, 0, 4, 5), Obis(1, 0, 0, 4, 6)
EVENT_CODE = Obis(0, 0, 96, 11, 0)
# Standard event log codes (IDIS): power down/up, clock adjusted (old time, new time).
POWER_DOWN, POWER_UP, CLOCK_ADJUSTED_OLD, CLOCK_ADJUSTED_NEW = 1, 2, 4, 5
A_PLUS, A_MINUS, R_PLUS, R_MINUS = Obis(1, 0, 1, 8, 0), Obis(1, 0, 2, 8, 0), Obis(1, 0, 3, 8, 0), Obis(1, 0, 4, 8, 0)
UNIT_WH, UNIT_VARH, UNIT_W, UNIT_V, UNIT_A, UNIT_HZ = 30, 32, 27, 35, 33, 44
SUCCESS, HARDWARE_FAULT, TEMPORARY_FAILURE, OBJECT_UNDEFINED, OBJECT_UNAVAILABLE, TYPE_UNMATCHED = 0, 1, 2, 4, 11, 12
READ_WRITE_DENIED = 3
OTHER_REASON = 250
#: Attributes and methods of each interface class (Blue Book; Association LN version 1).
CLASS_SHAPES = {1: (2, 0), 3: (3, 1), 4: (5, 1), 7: (8, 2), 8: (9, 6), 15: (9, 4), 17: (2, 1), 70: (4, 2)}
#: A profile's rows with start <= stamp <= end.
Rows = Callable[[datetime, datetime], list[Structure]]
#: Attribute access modes of the association's object list.
READ, READ_WRITE = 1, 3
#: "Up to the end of the buffer" for a profile read without a range.
EVERYTHING = datetime(9999, 12, 31, tzinfo=UTC)
#: A profile's capacity as attribute 8 reports it (the rows it keeps, at least those in use):
#: 60 days of 15-minute rows.
PROFILE_CAPACITY = 60 * 96
#: A GET answer's bytes around its data, at most: tag, kind, invoke id, last-block flag,
#: block number, choice and a three-byte length.
REPLY_OVERHEAD = 13
#: What general-glo-ciphering adds around an APDU: tag, length, security control, invocation
#: counter and the 12-byte authentication tag.
CIPHER_OVERHEAD = 1 + 3 + 1 + 4 + 12
#: GET-next with no block transfer going on (none asked, or the last block already sent);
#: a block number the transfer never had.
NO_LONG_GET_IN_PROGRESS, DATA_BLOCK_NUMBER_INVALID = 16, 19
DISCONNECTED, CONNECTED, READY = 0, 1, 2
STEP = timedelta(minutes=15)


@dataclass
class DlmsFaults:
    delay: float = 0.0
    drop_after_bytes: int | None = None
    corrupt: bool = False
    clock_offset_s: float = 0.0
    missing_intervals: set[datetime] = field(default_factory=set)
    stuck_relay: bool = False
    #: Every GET is answered in blocks that never end (a meter that never stops talking).
    endless_blocks: bool = False
    #: ... and with block number 1 every time, and no data (a count that never grows).
    repeat_block_number: bool = False
    #: Bytes sent after the value of every GET answer that goes in blocks (as the Gurux C
    #: example server does after a profile's last block).
    trailing_bytes: bytes = b""


@dataclass
class CosemObject:
    """One COSEM object: what each attribute answers (a value, or a bare int: the data-access
    result of a failure), which attributes can be written and how, which methods run."""

    class_id: int
    version: int
    obis: Obis
    read: dict[int, Callable[[Any], Any]]
    write: dict[int, Callable[[Any], int]] = field(default_factory=dict)
    methods: dict[int, Callable[[Any], int]] = field(default_factory=dict)
    #: Whether the meter has it now (the transformer ratios only on a CT/PT-connected meter).
    present: Callable[[], bool] = lambda: True


@dataclass
class RegisterSpec:
    """A class 3 register: how to get its value from the load, its scaler and unit."""

    type_tag: int
    scaler: int
    unit: int


REGISTERS: dict[Obis, RegisterSpec] = {
    A_PLUS: RegisterSpec(axdr.DOUBLE_LONG_UNSIGNED, 0, UNIT_WH),
    A_MINUS: RegisterSpec(axdr.DOUBLE_LONG_UNSIGNED, 0, UNIT_WH),
    R_PLUS: RegisterSpec(axdr.DOUBLE_LONG_UNSIGNED, 0, UNIT_VARH),
    R_MINUS: RegisterSpec(axdr.DOUBLE_LONG_UNSIGNED, 0, UNIT_VARH),
    Obis(1, 0, 16, 7, 0): RegisterSpec(axdr.DOUBLE_LONG, 0, UNIT_W),
    Obis(1, 0, 32, 7, 0): RegisterSpec(axdr.LONG_UNSIGNED, -1, UNIT_V),
    Obis(1, 0, 52, 7, 0): RegisterSpec(axdr.LONG_UNSIGNED, -1, UNIT_V),
    Obis(1, 0, 72, 7, 0): RegisterSpec(axdr.LONG_UNSIGNED, -1, UNIT_V),
    Obis(1, 0, 31, 7, 0): RegisterSpec(axdr.LONG_UNSIGNED, -2, UNIT_A),
    Obis(1, 0, 51, 7, 0): RegisterSpec(axdr.LONG_UNSIGNED, -2, UNIT_A),
    Obis(1, 0, 71, 7, 0): RegisterSpec(axdr.LONG_UNSIGNED, -2, UNIT_A),
    Obis(1, 0, 14, 7, 0): RegisterSpec(axdr.LONG_UNSIGNED, -2, UNIT_HZ),
}
ENERGIES = (A_PLUS, A_MINUS, R_PLUS, R_MINUS)
CAPTURE = [(8, CLOCK, 2), (1, STATUS, 2), (3, A_PLUS, 2), (3, A_MINUS, 2), (3, R_PLUS, 2), (3, R_MINUS, 2)]
EVENT_CAPTURE = [(8, CLOCK, 2), (1, EVENT_CODE, 2)]
MAX_DEMAND = Obis(1, 0, 1, 6, 0)  # class 4: the month's highest 15-minute import demand, with its time
#: Daily and monthly billing profiles: the energy registers frozen at midnight, at the month's start.
BILLING_PROFILES = (Obis(0, 0, 98, 1, 0), Obis(0, 0, 98, 2, 0))
BILLING_CAPTURE = [(8, CLOCK, 2), (3, A_PLUS, 2), (3, A_MINUS, 2), (3, R_PLUS, 2), (3, R_MINUS, 2)]


class SimulatedDlmsMeter:
    def __init__(
        self,
        name: str,
        clock: Clock,
        *,
        password: bytes = b"12345678",
        require_lls: bool = False,
        serial: str = "",
        installed: datetime | None = None,
        control_mode: int = 4,
        block_size: int = 1024,
        seed: int = 1,
        keys: codec.Keys | None = None,
        ct: tuple[int, int] | None = None,
        pt: tuple[int, int] | None = None,
    ) -> None:
        self.name = name
        #: Transformer ratios programmed into the meter (numerator, denominator); None: no object.
        self.ct, self.pt = ct, pt
        self.keys = keys or DEFAULT_KEYS
        self.system_title = f"SIM{seed:05d}".encode()[:8]
        self.invocation_counter = 0  # many real meters start at 0
        self.clock = clock
        self.password = password
        self.require_lls = require_lls
        self.serial = serial or f"SIM{seed:08d}"
        self.load = LoadModel(t0=clock.now(), seed=seed)
        now = clock.datetime()
        # The profile buffer starts at installation (default: 10 days of history).
        self.installed = installed or (now - timedelta(days=10))
        self.control_mode = control_mode
        self.control_state = CONNECTED
        self.block_size = block_size
        self.faults = DlmsFaults()
        self.associations = 0
        self.requests = 0
        #: The longest APDU answered (before ciphering): never more than a client said it takes.
        self.largest_reply = 0
        self.actions = 0
        self.events: list[tuple[datetime, int]] = []  # (meter time, event code), oldest first
        #: (true time from, clock offset s) of each clock set or jump; empty: never changed.
        self._clock_changes: list[tuple[datetime, float]] = []
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self.cosem = self._build_objects()
        self._stopping = False
        self.port = 0

    # -- values ------------------------------------------------------------------------

    def now(self) -> datetime:
        return self.clock.datetime() + timedelta(seconds=self.faults.clock_offset_s)

    def register_value(self, obis: Obis, t: float) -> int:
        spec = REGISTERS[obis]
        if obis == A_PLUS:
            value = self.load.import_kwh(t) * 1000
        elif obis == A_MINUS:
            value = self.load.export_kwh(t) * 1000
        elif obis == R_PLUS:
            value = self.load.import_kwh(t) * 250  # a power factor near 0.97
        elif obis == R_MINUS:
            value = 5_000.0 + self.load.seed
        else:
            value = self.load.value(obis, t)
        return round(value / 10.0**spec.scaler)

    def next_counter(self) -> int:
        value = self.invocation_counter
        self.invocation_counter += 1
        return value

    def offset_at(self, true_t: datetime) -> timedelta:
        """How far the meter's clock was off at a true time: `faults.clock_offset_s` for all
        time until the clock was first set or jumped, then what each change made it."""
        offset = self._clock_changes[0][1] if self._clock_changes else self.faults.clock_offset_s
        for since, value in self._clock_changes:
            if since < true_t:  # a change at c applies after c
                offset = value
        return timedelta(seconds=offset)

    def change_clock(self, offset_s: float, at: datetime | None = None) -> None:
        """The meter's clock is off by `offset_s` from now on (a clock set, or a jump); what
        was recorded before keeps the stamps it was given. `at`: when it happened, for a
        test's history (a jump in the past, before anyone read the meter)."""
        when = at or self.clock.datetime()
        if self._clock_changes and when < self._clock_changes[-1][0]:
            raise ValueError("clock changes happen in order")
        if not self._clock_changes:
            self._clock_changes.append((datetime.min.replace(tzinfo=UTC), self.faults.clock_offset_s))
        self._clock_changes.append((when, offset_s))
        self.faults.clock_offset_s = offset_s

    def captures(self, until: datetime, step: timedelta = STEP) -> Iterator[tuple[datetime, datetime]]:
        """(true time, stamp) of every profile capture from installation to `until`, in the
        order they happened: the meter captures when its own clock passes a boundary of its
        grid and stamps the row with that boundary (a clock set back repeats stamps, one set
        forward skips them), as a real meter does. Immutable: a later clock change or relay
        operation never alters a capture made before it."""
        bounds = [(since, timedelta(seconds=off)) for since, off in self._clock_changes] or [
            (datetime.min.replace(tzinfo=UTC), timedelta(seconds=self.faults.clock_offset_s))]
        for i, (since, off) in enumerate(bounds):
            # A change at time c applies to captures after c: one at c itself was made before it.
            next_change = bounds[i + 1][0] if i + 1 < len(bounds) else None
            stamp = _ceil_to(max(since, self.installed) + off, step)
            if i and stamp - off <= since:
                stamp += step
            while (t := stamp - off) <= until and (next_change is None or t <= next_change):
                yield t, stamp
                stamp += step

    def profile_rows(self, start: datetime, end: datetime) -> list[Structure]:
        """Rows stamped (in the meter's own time, as a meter selects by range) start <= t <= end,
        as recorded up to now."""
        rows = []
        for true_t, stamp in self.captures(self.clock.datetime()):
            if not start <= stamp <= end or _ceil_quarter(true_t) in self.faults.missing_intervals:
                continue
            ts = true_t.timestamp()
            energies = [Typed(axdr.DOUBLE_LONG_UNSIGNED, self.register_value(o, ts)) for o in ENERGIES]
            # Status bit 5 (0x20, clock invalid) while the meter's clock is off.
            status = Typed(axdr.UNSIGNED, 0x20 if self.offset_at(true_t) else 0)
            rows.append(Structure([Typed(axdr.OCTET_STRING, DateTime.from_datetime(stamp)), status, *energies]))
        return rows

    def billing_rows(self, start: datetime, end: datetime, *, monthly: bool) -> list[Structure]:
        """The daily (0-0:98.1.0) or monthly (0-0:98.2.0) billing profile: the energy registers
        frozen when the meter's clock passes midnight (the 1st of the month), stamped with it."""
        rows = []
        for true_t, stamp in self.captures(self.clock.datetime(), timedelta(days=1)):
            if not start <= stamp <= end or (monthly and stamp.day != 1):
                continue
            ts = true_t.timestamp()
            energies = [Typed(axdr.DOUBLE_LONG_UNSIGNED, self.register_value(o, ts)) for o in ENERGIES]
            rows.append(Structure([Typed(axdr.OCTET_STRING, DateTime.from_datetime(stamp)), *energies]))
        return rows

    def max_demand(self) -> tuple[int, datetime]:
        """The highest 15-minute average import power (W) since the month began, and when that
        quarter hour ended."""
        now = self.clock.datetime()
        t = max(now.replace(day=1, hour=0, minute=0, second=0, microsecond=0), self.installed)
        t = _ceil_quarter(t)
        best, at = 0, t
        while t + STEP <= now:
            watts = round((self.load.import_kwh((t + STEP).timestamp()) - self.load.import_kwh(t.timestamp())) * 4000)
            if watts > best:
                best, at = watts, t + STEP
            t += STEP
        return best, at

    def power_outage(self, start: datetime, end: datetime) -> None:
        """The meter was without supply: no profile rows in between, power down/up logged."""
        t = start
        while t <= end:
            self.faults.missing_intervals.add(t)
            t += STEP
        self.events += [(start, POWER_DOWN), (end, POWER_UP)]
        self.events.sort()

    def event_rows(self, start: datetime, end: datetime) -> list[Structure]:
        return [
            Structure([Typed(axdr.OCTET_STRING, DateTime.from_datetime(t)), Typed(axdr.UNSIGNED, code)])
            for t, code in self.events
            if start <= t <= end
        ]

    # -- COSEM objects -------------------------------------------------------------------

    @property
    def profiles(self) -> dict[Obis, tuple[list[tuple[int, Obis, int]], int, Rows]]:
        """Each profile generic: its capture objects, capture period (s; 0: on events) and rows."""
        return {
            PROFILE: (CAPTURE, int(STEP.total_seconds()), self.profile_rows),
            EVENT_LOG: (EVENT_CAPTURE, 0, self.event_rows),
            BILLING_PROFILES[0]: (BILLING_CAPTURE, 86_400, lambda s, e: self.billing_rows(s, e, monthly=False)),
            BILLING_PROFILES[1]: (BILLING_CAPTURE, 31 * 86_400, lambda s, e: self.billing_rows(s, e, monthly=True)),
        }

    def _profile_attribute(self, request: xdlms.GetRequest, capture: list[tuple[int, Obis, int]], period: int,
                           rows: Rows) -> Any:  # fmt: skip
        u16, i8, u32 = axdr.LONG_UNSIGNED, axdr.INTEGER, axdr.DOUBLE_LONG_UNSIGNED
        index = request.attribute.index
        if index == 2:
            try:
                if request.selector is None:
                    return rows(self.installed, EVERYTHING)
                if request.selector == 1:
                    return rows(*_range(request.parameters))
                if request.selector == 2:
                    return _by_entry(rows(self.installed, EVERYTHING), request.parameters)
            except (ValueError, axdr.AxdrError):
                return TYPE_UNMATCHED  # a selective access descriptor that is not one
            return OBJECT_UNAVAILABLE
        if index == 3:
            return [Structure([Typed(u16, c), o.to_bytes(), Typed(i8, i), Typed(u16, 0)]) for c, o, i in capture]
        if index == 4:
            return Typed(u32, period)
        if index == 5:
            return Typed(axdr.ENUM, 1)  # sort method: fifo (oldest first)
        if index == 6:
            return Structure([Typed(u16, 0), bytes(6), Typed(i8, 0), Typed(u16, 0)])  # sort object: none
        if index in (7, 8):
            used = len(rows(self.installed, EVERYTHING))
            return Typed(u32, used if index == 7 else max(used, PROFILE_CAPACITY))
        return OBJECT_UNDEFINED

    def _build_objects(self) -> dict[tuple[int, Obis], CosemObject]:
        """Every COSEM object of this meter: what each attribute answers, which can be
        written (and how), which methods run. GET, SET, ACTION and the object list all come
        from this one table."""
        u8, u16, u32, i8, enum = axdr.UNSIGNED, axdr.LONG_UNSIGNED, axdr.DOUBLE_LONG_UNSIGNED, axdr.INTEGER, axdr.ENUM
        objects = [
            # reply_to_HLS_authentication runs in the association's own handshake (Association).
            CosemObject(15, 1, CURRENT_ASSOCIATION, {2: lambda _r: self.object_list(management=True)},
                        methods={1: lambda _r: OTHER_REASON}),
            CosemObject(8, 0, CLOCK, {2: lambda _r: Typed(axdr.OCTET_STRING, DateTime.from_datetime(self.now())),
                                      3: lambda _r: Typed(axdr.LONG, 0)},
                        write={2: self._set_clock}),
            CosemObject(4, 0, MAX_DEMAND, {
                2: lambda _r: Typed(u32, self.max_demand()[0]),
                3: lambda _r: Structure([Typed(i8, 0), Typed(enum, UNIT_W)]),
                4: lambda _r: Typed(u8, 0),  # status: nothing to report
                5: lambda _r: Typed(axdr.OCTET_STRING, DateTime.from_datetime(
                    self.max_demand()[1] + self.offset_at(self.clock.datetime()))),
            }),
            CosemObject(1, 0, STATUS, {2: lambda _r: Typed(u8, 0x20 if self.offset_at(self.clock.datetime()) else 0)}),
            CosemObject(1, 0, EVENT_CODE, {2: lambda _r: Typed(u8, self.events[-1][1] if self.events else 0)}),
            CosemObject(1, 0, SERIAL, {2: lambda _r: self.serial}),
            CosemObject(1, 0, FIRMWARE, {2: lambda _r: "SIM-DLMS 2.1"}),
            CosemObject(1, 0, LDN, {2: lambda _r: f"SIM{self.name}"[:16].encode()}),
            CosemObject(17, 0, SAP_ASSIGNMENT, {2: lambda _r: [Structure([Typed(u16, 1),
                                                                         f"SIM{self.name}"[:16].encode()])]}),
            CosemObject(70, 0, DISCONNECT, {2: lambda _r: self.control_state == CONNECTED,
                                            3: lambda _r: Typed(enum, self.control_state),
                                            4: lambda _r: Typed(enum, self.control_mode)},
                        write={4: self._set_control_mode}, methods={1: self._operate, 2: self._operate}),
        ]
        for obis, spec in REGISTERS.items():
            objects.append(CosemObject(3, 0, obis, {
                2: lambda _r, o=obis, s=spec: Typed(s.type_tag, self.register_value(o, self.clock.now())),
                3: lambda _r, s=spec: Structure([Typed(i8, s.scaler), Typed(enum, s.unit)]),
            }))  # fmt: skip
        for obis, (capture, period, rows) in self.profiles.items():
            objects.append(CosemObject(7, 1, obis, {
                i: lambda r, c=capture, p=period, rw=rows: self._profile_attribute(r, c, p, rw) for i in range(2, 9)
            }))  # fmt: skip
        for obis, which, part in ((CT_NUM, "ct", 0), (CT_DEN, "ct", 1), (PT_NUM, "pt", 0), (PT_DEN, "pt", 1)):
            objects.append(CosemObject(1, 0, obis, {2: lambda _r, w=which, i=part: Typed(u16, getattr(self, w)[i])},
                                       present=lambda w=which: getattr(self, w) is not None))  # fmt: skip
        return {(o.class_id, o.obis): o for o in objects}

    def objects(self) -> list[tuple[int, int, Obis, dict[int, int], dict[int, int]]]:
        """(class id, version, logical name, attribute access, method access) of every object
        there now, as a management client (LLS or HLS) may use them: every attribute and
        method of its class, 0 (no access) where this meter gives none (a client reads a
        missing entry as full access)."""
        out = []
        for o in self.cosem.values():
            if not o.present():
                continue
            attributes, methods = CLASS_SHAPES[o.class_id]
            access = {i: READ_WRITE if i in o.write else READ if i == 1 or i in o.read else 0
                      for i in range(1, attributes + 1)}  # fmt: skip
            out.append((o.class_id, o.version, o.obis, access, {m: int(m in o.methods) for m in range(1, methods + 1)}))
        return out

    def object_list(self, management: bool) -> list[Structure]:
        """Attribute 2 of the association (0-0:40.0.0.255): every object with the access this
        association has to it (the public client reads; it writes and operates nothing)."""
        u16, u8, i8, enum = axdr.LONG_UNSIGNED, axdr.UNSIGNED, axdr.INTEGER, axdr.ENUM
        out = []
        for class_id, version, obis, attributes, methods in self.objects():
            attribute_access = [Structure([Typed(i8, i), Typed(enum, mode if management else mode & READ),
                                           [Typed(i8, 1), Typed(i8, 2)] if (class_id, i) == (7, 2) else None])
                                for i, mode in attributes.items()]  # fmt: skip
            method_access = [Structure([Typed(i8, m), Typed(enum, mode if management else 0)])
                             for m, mode in methods.items()]  # fmt: skip
            out.append(Structure([Typed(u16, class_id), Typed(u8, version), obis.to_bytes(),
                                  Structure([attribute_access, method_access])]))  # fmt: skip
        return out

    # -- COSEM services ------------------------------------------------------------------

    def _object(self, class_id: int, obis: Obis) -> CosemObject | None:
        found = self.cosem.get((class_id, obis))
        return found if found is not None and found.present() else None

    def get(self, request: xdlms.GetRequest) -> Any:
        """Return the attribute's value, or a bare int: the data-access-result of a failure."""
        a = request.attribute
        obj = self._object(a.class_id, a.obis)
        if obj is None:
            return OBJECT_UNDEFINED
        if a.index == 1:
            return a.obis.to_bytes()  # every object's logical name
        read = obj.read.get(a.index)
        return OBJECT_UNDEFINED if read is None else read(request)

    def set(self, request: xdlms.SetRequest) -> int:
        a = request.attribute
        obj = self._object(a.class_id, a.obis)
        if obj is None:
            return OBJECT_UNDEFINED
        write = obj.write.get(a.index)
        if write is None:
            # There, and readable, but not writable; or no such attribute.
            return READ_WRITE_DENIED if a.index == 1 or a.index in obj.read else OBJECT_UNDEFINED
        try:
            return write(axdr.decode(request.data))
        except (axdr.AxdrError, ValueError):  # not A-XDR, or not a date-time (a 13th month)
            return TYPE_UNMATCHED

    def _set_clock(self, value: Any) -> int:
        if not isinstance(value, bytes) or len(value) != 12:
            return TYPE_UNMATCHED
        wanted = DateTime.from_bytes(value).to_utc()
        self.events += [(self.now().replace(microsecond=0), CLOCK_ADJUSTED_OLD),
                        (wanted.replace(microsecond=0), CLOCK_ADJUSTED_NEW)]  # fmt: skip
        self.change_clock((wanted - self.clock.datetime()).total_seconds())
        return SUCCESS

    def _set_control_mode(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 6:
            return TYPE_UNMATCHED
        self.control_mode = value
        return SUCCESS

    def action(self, request: xdlms.ActionRequest) -> int:
        m = request.method
        obj = self._object(m.class_id, m.obis)
        method = obj.methods.get(m.index) if obj is not None else None
        return OBJECT_UNDEFINED if method is None else method(request)

    def _operate(self, request: xdlms.ActionRequest) -> int:
        """Disconnect control's remote_disconnect (1) and remote_reconnect (2)."""
        self.actions += 1
        if self.control_mode == 0:
            return TEMPORARY_FAILURE  # mode 0: the disconnector is always connected
        if self.faults.stuck_relay:
            return SUCCESS  # acknowledged; the relay does not move: only a read-back shows it
        t = self.clock.now()
        if request.method.index == 1:
            self.control_state = DISCONNECTED
            self.load.set_relay(False, t)
        elif self.control_state == DISCONNECTED:
            # Modes 1, 3, 5: the customer must press the button; 2, 4, 6: straight back on.
            self.control_state = READY if self.control_mode in (1, 3, 5) else CONNECTED
            self.load.set_relay(self.control_state == CONNECTED, t)
        elif self.control_state == READY and self.control_mode not in (1, 3, 5):
            self.control_state = CONNECTED
            self.load.set_relay(True, t)
        return SUCCESS

    def press_button(self) -> None:
        """The customer's manual reconnect at the meter."""
        if self.control_state == READY:
            self.control_state = CONNECTED
            self.load.set_relay(True, self.clock.now())

    # -- the wire ------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._serve, host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        self._stopping = True
        if self._server is not None:
            self._server.close()
            for writer in list(self._connections):
                writer.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        association = Association(self)
        self._connections.add(writer)
        try:
            while True:
                try:
                    frame = await read_frame(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                except asyncio.CancelledError:
                    if self._stopping:  # closing the connection cancels the pending read
                        return
                    raise
                except WrapperError as exc:
                    log.warning("%s: bad wrapper frame %s", self.name, exc.raw.hex())
                    return
                reply = association.handle(frame.apdu)
                if self.faults.delay:
                    await asyncio.sleep(self.faults.delay)
                out = WrapperFrame(frame.destination, frame.source, reply).to_bytes()
                if not await self.send_with_faults(writer, out, header=8):
                    return
        finally:
            self._connections.discard(writer)
            writer.close()

    def service(self, apdu: bytes, blocks: list[bytes], lls: bool,
                max_pdu: int = 0xFFFF) -> tuple[bytes, list[bytes]]:  # fmt: skip
        """`max_pdu`: the longest APDU the client said it takes (its AARQ's max receive PDU)."""
        reply, kept = self._service(apdu, blocks, lls, max(1, min(self.block_size, max_pdu - REPLY_OVERHEAD)))
        self.largest_reply = max(self.largest_reply, len(reply))
        return reply, kept

    def _service(self, apdu: bytes, blocks: list[bytes], lls: bool, block_size: int) -> tuple[bytes, list[bytes]]:
        try:
            request = xdlms.parse_request(apdu)
        except (xdlms.XdlmsError, ValueError):
            return xdlms.ExceptionResult(2, 1).to_bytes(), []
        if isinstance(request, xdlms.GetRequestNext) and self.faults.endless_blocks:
            n = 1 if self.faults.repeat_block_number else request.block_number + 1
            size = 0 if self.faults.repeat_block_number else block_size
            return xdlms.GetResult(request.invoke_id, data=bytes(size), block_number=n,
                                   last_block=False).to_bytes(), [b""]  # fmt: skip
        if isinstance(request, xdlms.GetRequestNext):
            if not blocks or request.block_number == len(blocks):  # none going on, or the last one sent
                return xdlms.GetResult(request.invoke_id, error=NO_LONG_GET_IN_PROGRESS,
                                       block_number=request.block_number).to_bytes(), []  # fmt: skip
            if not 1 <= request.block_number < len(blocks):
                return xdlms.GetResult(request.invoke_id, error=DATA_BLOCK_NUMBER_INVALID,
                                       block_number=request.block_number).to_bytes(), []  # fmt: skip
            n = request.block_number + 1
            last = n == len(blocks)
            return xdlms.GetResult(
                request.invoke_id, data=blocks[n - 1], block_number=n, last_block=last
            ).to_bytes(), blocks
        if isinstance(request, xdlms.GetRequest):
            a = request.attribute
            if (a.class_id, a.obis, a.index) == (15, CURRENT_ASSOCIATION, 2):
                value: Any = self.object_list(management=lls)
            else:
                value = self.get(request)
            if type(value) is int:  # get() answers values as Typed/bytes/str/...; a bare int is an error
                return xdlms.GetResult(request.invoke_id, error=value).to_bytes(), []
            data = axdr.encode(value)
            if len(data) > block_size:
                data += self.faults.trailing_bytes
            if self.faults.endless_blocks:
                head = data[:block_size]
                return xdlms.GetResult(request.invoke_id, data=head, block_number=1, last_block=False).to_bytes(), [b""]
            if len(data) <= block_size:
                return xdlms.GetResult(request.invoke_id, data=data).to_bytes(), []
            chunks = [data[i : i + block_size] for i in range(0, len(data), block_size)]
            first = xdlms.GetResult(request.invoke_id, data=chunks[0], block_number=1, last_block=len(chunks) == 1)
            return first.to_bytes(), chunks
        if isinstance(request, xdlms.SetRequest):
            if not lls:  # the public client reads; it never writes (clock, control mode)
                return xdlms.SetResult(request.invoke_id, READ_WRITE_DENIED).to_bytes(), []
            return xdlms.SetResult(request.invoke_id, self.set(request)).to_bytes(), []
        if not lls:  # the public client runs no methods (the relay's least of all)
            return xdlms.ActionResult(request.invoke_id, READ_WRITE_DENIED).to_bytes(), []
        return xdlms.ActionResult(request.invoke_id, self.action(request)).to_bytes(), []

    async def send_with_faults(self, writer: asyncio.StreamWriter, out: bytes, header: int) -> bool:
        """Write an answer as the faults say; False when the connection was dropped."""
        if self.faults.corrupt:
            out = out[:header] + bytes(b ^ 0x5A for b in out[header:])
        if self.faults.drop_after_bytes is not None:
            writer.write(out[: self.faults.drop_after_bytes])
            await writer.drain()
            return False
        writer.write(out)
        await writer.drain()
        return True


class Association:
    """One client's association with a meter: ACSE (with HLS-GMAC passes 3 and 4), then xDLMS
    services, ciphered when the association is, GET blocks pending."""

    def __init__(self, meter: SimulatedDlmsMeter) -> None:
        self.meter = meter
        self.associated = False
        self.lls = False
        self.blocks: list[bytes] = []
        self.protection: Protection | None = None
        self.hls_pending = False
        self.client_challenge = b""
        self.server_challenge = b""
        #: What the client said it takes (AARQ), less what ciphering adds around an APDU.
        self.max_pdu = 0xFFFF

    def handle(self, apdu: bytes) -> bytes:
        """The answer to one APDU. Whatever a request makes go wrong here, a meter answers it
        (an ExceptionResponse) and keeps the association; it never drops the line."""
        try:
            return self._handle(apdu)
        except Exception:
            log.exception("%s: request %s could not be served", self.meter.name, apdu[:64].hex())
            return xdlms.ExceptionResult(2, 3).to_bytes()  # service-unknown, other-reason

    def _handle(self, apdu: bytes) -> bytes:
        meter = self.meter
        meter.requests += 1
        if apdu[:1] == bytes([codec.AARQ_TAG]):
            return self._associate(apdu)
        if apdu[:1] == bytes([codec.RLRQ_TAG]):
            self.associated = self.hls_pending = False
            self.protection = None
            return codec.rlre()
        if self.protection is not None:
            try:
                plain = self.protection.unwrap(apdu)
            except ProtectionError as exc:
                log.warning("%s: ciphered APDU refused: %s", meter.name, exc)
                return xdlms.ExceptionResult(2, 6).to_bytes()  # service-unknown: could not decipher
            reply = self._hls_pass_3(plain) if self.hls_pending else self._serve(plain)
            if reply[:1] == bytes([xdlms.EXCEPTION_RESPONSE]):
                return reply  # exception responses go unciphered (there is no ciphered form of them)
            return self.protection.wrap(reply)
        if not self.associated:
            return xdlms.ExceptionResult(1, 2).to_bytes()  # service not allowed: no association
        return self._serve(apdu)

    def _serve(self, apdu: bytes) -> bytes:
        reply, self.blocks = self.meter.service(apdu, self.blocks, self.lls or self.protection is not None,
                                                self.max_pdu)  # fmt: skip
        return reply

    def _associate(self, apdu: bytes) -> bytes:
        meter = self.meter
        self.protection = None
        self.hls_pending = self.associated = False
        try:
            request = codec.parse_aarq(apdu)
        except codec.AcseError:
            return codec.aare(False, failure="no_reason_given")
        ciphering = CIPHER_OVERHEAD if request.authentication == codec.AUTH_HLS_GMAC else 0
        self.max_pdu = request.max_pdu - ciphering
        if request.authentication == codec.AUTH_HLS_GMAC:
            initiate = request.ciphered_initiate
            if not (request.system_title and request.password and initiate):
                return codec.aare(False, authentication=request.authentication, failure="authentication_failed")
            try:
                plain = codec.decrypt(codec.SC_AUTH_ENC, request.system_title, initiate.invocation_counter,
                                      meter.keys, initiate.text)  # fmt: skip
            except codec.AcseError:
                return codec.aare(False, authentication=request.authentication, failure="authentication_failed")
            self.max_pdu = codec.client_max_pdu(plain) - ciphering
            self.protection = Protection(meter.keys, meter.system_title, request.system_title, meter.next_counter,
                                         peer_counter=initiate.invocation_counter)  # fmt: skip
            self.client_challenge = request.password
            self.server_challenge = secrets.token_bytes(16)
            self.hls_pending = True
            return codec.aare(
                True, authentication=request.authentication, system_title=meter.system_title,
                challenge=self.server_challenge, keys=meter.keys, counter=meter.next_counter(),
            )  # fmt: skip
        self.lls = request.authentication == codec.AUTH_LLS
        ok = (self.lls and request.password == meter.password) or (not self.lls and not meter.require_lls)
        self.associated = ok
        meter.associations += int(ok)
        reason = "authentication_failed" if self.lls else "authentication_required"
        return codec.aare(ok, authentication=request.authentication, failure=reason)

    def _hls_pass_3(self, plain: bytes) -> bytes:
        """Only reply_to_HLS_authentication is allowed until the client has proven its keys."""
        meter = self.meter
        try:
            request = xdlms.parse_request(plain)
        except xdlms.XdlmsError:
            return xdlms.ExceptionResult(1, 2).to_bytes()
        if not (isinstance(request, xdlms.ActionRequest) and request.method.class_id == 15
                and request.method.obis == CURRENT_ASSOCIATION and request.method.index == 1):  # fmt: skip
            return xdlms.ExceptionResult(1, 2).to_bytes()
        assert self.protection is not None
        try:
            value = axdr.decode(request.parameters or b"")
        except axdr.AxdrError:
            value = None
        if not isinstance(value, bytes) or not hls_check(value, self.protection.peer_title, meter.keys,
                                                          self.server_challenge):  # fmt: skip
            return xdlms.ActionResult(request.invoke_id, 250).to_bytes()  # other-reason: authentication failed
        self.hls_pending = False
        self.associated = True
        meter.associations += 1
        proof = hls_reply(meter.system_title, meter.next_counter(), meter.keys, self.client_challenge)
        return xdlms.ActionResult(request.invoke_id, 0, axdr.encode(proof)).to_bytes()


def _ceil_to(t: datetime, step: timedelta) -> datetime:
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return epoch - ((epoch - t) // step) * step


def _ceil_quarter(t: datetime) -> datetime:
    return _ceil_to(t, STEP)


def _by_entry(rows: list[Structure], parameters: bytes) -> list[Structure]:
    """Selective access by entry (selector 2): entries from_entry..to_entry (1 = the oldest;
    to 0 = the last), columns from_selected_value..to_selected_value (1-based; to 0 = the last)."""
    value = axdr.decode(parameters)
    if not isinstance(value, Structure) or len(value) != 4 or not all(type(v) is int for v in value):
        raise ValueError("entry descriptor must be a structure of four unsigned numbers")
    first_entry, last_entry, first_value, last_value = value
    if first_entry < 1 or (last_entry and last_entry < first_entry) or first_value < 1 or \
            (last_value and last_value < first_value):
        raise ValueError(f"entry descriptor out of order: {value}")
    chosen = rows[first_entry - 1 : last_entry or len(rows)]
    return [Structure(list(row)[first_value - 1 : last_value or len(row)]) for row in chosen]


def _range(parameters: bytes) -> tuple[datetime, datetime]:
    value = axdr.decode(parameters)
    if not isinstance(value, Structure) or len(value) < 3:
        raise ValueError("range descriptor must be a structure")
    return DateTime.from_bytes(value[1]).to_utc(), DateTime.from_bytes(value[2]).to_utc()


async def _main(args: argparse.Namespace) -> None:
    clock = Clock()
    meters = [SimulatedDlmsMeter(f"{i:03d}", clock, seed=i + 1) for i in range(args.meters)]
    if args.hdlc_serial or args.hdlc_tcp is not None:
        # One HDLC bus: the meters answer at physical addresses 0x11, 0x12, ...
        bus = HdlcBus({0x11 + i: m for i, m in enumerate(meters)})
        if args.hdlc_serial:
            await bus.start_serial(args.hdlc_serial, args.baudrate)
            where = f"{args.hdlc_serial} at {args.baudrate} baud"
        else:
            await bus.start_tcp(args.host, args.hdlc_tcp)
            where = f"hdlc+tcp {args.host}:{bus.port}"
        for i, m in enumerate(meters):
            print(f"DLMS meter {m.serial} at HDLC physical address 0x{0x11 + i:02x} on {where}", flush=True)
    else:
        for i, m in enumerate(meters):
            await m.start(args.host, args.port + i if args.port else 0)
            print(f"DLMS meter {m.serial} on {args.host}:{m.port} (TCP wrapper)", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--meters", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4059, help="first TCP wrapper port (one per meter; 0: any free ones)")
    p.add_argument("--hdlc-serial", help="serve all meters as one HDLC bus on this serial port")
    p.add_argument("--hdlc-tcp", type=int, help="serve all meters as one HDLC bus on this TCP port")
    p.add_argument("--baudrate", type=int, default=9600)
    asyncio.run(_main(p.parse_args()))


@dataclass
class _HdlcLink:
    """Per (connection, client, meter) on a bus: the HDLC link's state and the association."""

    hdlc: HdlcConnection
    association: Association


class HdlcBus:
    """Meters on one HDLC line (a serial port or a TCP socket), selected by physical address.
    Each link's HDLC state is the same sans-IO HdlcConnection the client uses, in the
    server's role."""

    def __init__(self, meters: dict[int, SimulatedDlmsMeter], *, max_info: int = hdlc.DEFAULT_MAX_INFO) -> None:
        self.meters = meters
        self.max_info = max_info
        self.bad_frames = 0
        #: The longest information field sent: never more than a client's SNRM said it takes.
        self.largest_info = 0
        #: Associations open at once on this bus, at most (a bus carries one: more is a head-end bug).
        self.most_connected = 0
        #: Physical addresses in the order their associations opened (SNRM).
        self.sessions: list[int] = []
        # Per connection (a serial line is one): an association never outlives its connection.
        self._links: dict[tuple[int, bytes, int], _HdlcLink] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._stopping = False
        self.port = 0

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self.serve, host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def start_serial(self, device: str, baudrate: int = 9600) -> None:
        reader, writer = await serial_asyncio_fast.open_serial_connection(url=device, baudrate=baudrate)
        task = asyncio.create_task(self.serve(reader, writer))
        self._tasks.add(task)

    async def stop(self) -> None:
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def _meter(self, destination: bytes) -> tuple[int, SimulatedDlmsMeter] | None:
        _logical, physical = hdlc.address_parts(destination)
        if physical is None and len(self.meters) == 1:
            physical = next(iter(self.meters))
        meter = self.meters.get(physical) if physical is not None else None
        return (physical, meter) if meter is not None and physical is not None else None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        connection = id(writer)
        frames = FrameReader()
        try:
            while True:
                try:
                    data = await reader.read(4096)
                except ConnectionError:
                    return
                except asyncio.CancelledError:
                    if self._stopping:  # closing the line cancels the pending read
                        return
                    raise
                if not data:
                    return
                frames.feed(data)
                while True:
                    try:
                        frame = frames.next_frame()
                    except hdlc.HdlcError as exc:
                        self.bad_frames += 1
                        log.warning("HDLC bus: bad frame %s (%s)", exc.raw.hex(), exc)
                        continue
                    if frame is None:
                        break
                    try:
                        served = await self._on_frame(connection, frame, writer)
                    except Exception:  # a bus keeps serving its other meters whatever one frame did
                        self.bad_frames += 1
                        log.exception("HDLC bus: frame %s could not be served", frame.to_bytes()[:64].hex())
                        continue
                    if not served:
                        return
        finally:
            for key in [k for k in self._links if k[0] == connection]:
                del self._links[key]
            self._writers.discard(writer)
            writer.close()

    async def _on_frame(self, connection: int, frame: hdlc.Frame, writer: asyncio.StreamWriter) -> bool:
        """False when the connection was dropped (a fault)."""
        found = self._meter(frame.destination)
        if found is None:
            return True  # nobody on the line has this address: silence, as on a real bus
        physical, meter = found
        key = (connection, frame.source, physical)
        link = self._links.get(key)
        if link is None:
            link = self._links[key] = _HdlcLink(
                HdlcConnection(frame.destination, frame.source, server=True, max_info=self.max_info),
                Association(meter),
            )  # fmt: skip
        if frame.control == hdlc.SNRM:
            self.sessions.append(physical)
            link.association = Association(meter)
        try:
            events = link.hdlc.receive_frame(frame)
        except hdlc.HdlcError as exc:
            self.bad_frames += 1
            log.warning("HDLC bus: %s from %s", exc, frame.source.hex())
            return True
        for event in events:
            if isinstance(event, Received):
                link.hdlc.send(link.association.handle(event.apdu))
        self.largest_info = max(self.largest_info, link.hdlc.largest_sent)
        self.most_connected = max(self.most_connected, sum(1 for item in self._links.values() if item.hdlc.connected))
        out = link.hdlc.data_to_send()
        if not out:
            return True
        if meter.faults.delay:
            await asyncio.sleep(meter.faults.delay)
        return await meter.send_with_faults(writer, out, header=3)


if __name__ == "__main__":
    main()
