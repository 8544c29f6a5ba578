"""Checks every protocol shares: identity against the registry, CT/PT, clock, relay, the first
energy read, a short profile sample, the optional relay test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

from headend.commission.report import Check, FoundMeter, Report
from headend.config import Meter, SwitchingConfig
from headend.model import IMPORT_ENERGY, Obis, RelayAction, RelayState
from headend.protocols.base import MeterError, MeterSession, Unsupported
from headend.registry import Registry
from headend.switching.engine import COMMISSIONING, SwitchingEngine
from headend.switching.journal import CommandJournal, CommandState
from headend.switching.policy import OVERRIDE_ROLE, SwitchingPolicy
from headend.timegrid import floor_to

#: The profile each protocol samples: a DLMS load profile, a concentrator's interval channel.
DLMS_PROFILE = Obis(1, 0, 99, 1, 0)


@dataclass
class Options:
    engineer: str = ""
    site: str = ""
    sync_clock: bool = False
    test_relay: bool = False
    clock_tolerance_s: float = 30.0
    clock_fail_s: float = 300.0
    profile_hours: float = 2.0
    interval: timedelta = timedelta(minutes=15)
    probe_timeout: float = 0.3
    time_box: float = 120.0
    addresses: list[int] | None = None
    birth_timeout: float = 10.0
    relay_confirm_s: float = 10.0
    #: `--override REASON`: the relay test may switch protected customers (journaled).
    override: str | None = None
    #: The site's switching rules (protection; the command journal lives in state_dir).
    switching: SwitchingConfig = field(default_factory=SwitchingConfig)
    #: Where DLMS HLS invocation counters are kept: the server's state_dir, so the meter sees
    #: one increasing counter whichever tool talks to it.
    state_dir: Path = Path("var/state")


Progress = Callable[[int, int, str], None]  # done, total, what
T = TypeVar("T")


def time_boxed(items: list[T], noun: str, opts: Options, report: Report, progress: Progress) -> Iterator[T]:
    """The items of a scan, one by one, until `opts.time_box` runs out (then a warning saying
    how far it got); the progress bar follows."""
    deadline = time.monotonic() + opts.time_box
    for done, item in enumerate(items):
        if time.monotonic() > deadline:
            report.add(Check("discovery", "warn", f"time box of {opts.time_box:g} s reached after {done} of "
                             f"{len(items)} {noun}", hint="narrow --addresses or raise --time-box"))  # fmt: skip
            break
        progress(done, len(items), f"{noun} {item}")
        yield item
    progress(len(items), len(items), "done")


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def identity(report: Report, label: str, found: FoundMeter, expected: Meter | None, registry: Registry | None) -> None:
    """Is the meter answering here the one the registry books here? A different serial that the
    registry books elsewhere is a swap: someone's bill would go to the wrong account."""
    booked = _by_serial(registry, found.serial) if found.serial else None
    if expected is None:
        where = f"; serial {found.serial} is booked to {booked.id}" if booked else ""
        report.add(Check("identity", "warn", f"serial {found.serial or '?'} at {found.address}", meter=label,
                         expected="a registry entry for this address",
                         hint=f"not in the registry{where}; --register adds it"))  # fmt: skip
        return
    found.registry_id = expected.id
    if found.serial is None:
        report.add(Check("identity", "warn", "serial not readable", meter=label, expected=expected.serial or "",
                         hint="the meter did not give a serial number; check the model by eye"))  # fmt: skip
    elif expected.serial is None:
        report.add(Check("identity", "warn", f"serial {found.serial}", meter=label, expected="(none in the registry)",
                         hint="the registry has no serial for this meter: add it so swaps are caught"))  # fmt: skip
    elif found.serial.strip() == expected.serial.strip():
        report.add(Check("identity", "pass", f"serial {found.serial}", meter=label, expected=expected.serial))
    else:
        other = f"; serial {found.serial} is booked to meter {booked.id}" + (
            f" (customer {booked.customer})" if booked and booked.customer else "") if booked else ""  # fmt: skip
        customer = f" (customer {expected.customer})" if expected.customer else ""
        report.add(Check("identity", "fail", f"serial {found.serial} answers at {found.address}", meter=label,
                         expected=f"serial {expected.serial} (meter {expected.id}{customer})",
                         hint="wrong meter or meters swapped: readings would be booked to the wrong account"
                              + other))  # fmt: skip


def _by_serial(registry: Registry | None, serial: str) -> Meter | None:
    if registry is None:
        return None
    return next((m for m in registry.meters() if m.serial and m.serial.strip() == serial.strip()), None)


def ratio(report: Report, label: str, programmed: float | None, expected: Meter | None, why: str = "") -> None:
    registered = expected.multiplier if expected else None
    if programmed is None:
        report.add(Check("ct_pt", "info", why or "not readable from the meter", meter=label,
                         expected=f"x{registered:g} in the registry" if registered else "",
                         hint="check the transformer plates against the registry by eye"))  # fmt: skip
    elif registered is None:
        report.add(Check("ct_pt", "info", f"meter programmed x{programmed:g}", meter=label))
    elif abs(programmed - registered) > 1e-9 * max(1.0, registered):
        report.add(Check("ct_pt", "fail", f"meter programmed x{programmed:g}", meter=label,
                         expected=f"x{registered:g} (registry)",
                         hint="wrong CT/PT multiplier: every bill would be off by this factor; fix the registry "
                              "or the meter before the first read is billed"))  # fmt: skip
    else:
        report.add(Check("ct_pt", "pass", f"meter programmed x{programmed:g}", meter=label,
                         expected=f"x{registered:g}"))  # fmt: skip


async def session_checks(session: MeterSession, report: Report, label: str, opts: Options, *,
                         profile: Obis = DLMS_PROFILE, meter: Meter | None = None,
                         registry: Registry | None = None) -> None:  # fmt: skip
    drift = await _clock(session, report, label, opts)
    relay = await _relay(session, report, label)
    await _energy(session, report, label)
    await _profile(session, report, label, opts, profile, drift)
    if opts.test_relay and relay is not None:
        await relay_test(session, report, label, opts, relay, meter, registry)


async def _clock(session: MeterSession, report: Report, label: str, opts: Options) -> float:
    """The drift found (seconds, meter ahead positive), or 0 when there is no clock."""
    try:
        meter_time = await session.read_clock()
    except Unsupported:
        report.add(Check("clock", "info", "no clock over this protocol", meter=label))
        return 0.0
    except MeterError as exc:
        report.add(Check("clock", "fail", error_text(exc), meter=label))
        return 0.0
    drift = (meter_time - datetime.now(UTC)).total_seconds()
    measured = f"{round(drift):+d} s"
    if abs(drift) <= opts.clock_tolerance_s:
        report.add(Check("clock", "pass", measured, meter=label, expected=f"within ±{opts.clock_tolerance_s:g} s"))
        return drift
    if opts.sync_clock:
        try:
            await session.set_clock(datetime.now(UTC))
            after = (await session.read_clock() - datetime.now(UTC)).total_seconds()
        except MeterError as exc:
            report.add(Check("clock", "fail", f"{measured}; sync failed: {error_text(exc)}", meter=label))
            return drift
        status = "pass" if abs(after) <= opts.clock_tolerance_s else "fail"
        report.add(Check("clock", status, f"{measured}, synced to {round(after):+d} s", meter=label,
                         expected=f"within ±{opts.clock_tolerance_s:g} s"))  # fmt: skip
        return drift
    status = "fail" if abs(drift) > opts.clock_fail_s else "warn"
    report.add(Check("clock", status, measured, meter=label, expected=f"within ±{opts.clock_tolerance_s:g} s",
                     hint="rerun with --sync-clock to set it; intervals read meanwhile are stamped wrong"))  # fmt: skip
    return drift


async def _relay(session: MeterSession, report: Report, label: str) -> RelayState | None:
    try:
        state = await session.read_relay()
    except Unsupported:
        report.add(Check("relay", "info", "no relay", meter=label))
        return None
    except MeterError as exc:
        report.add(Check("relay", "warn", error_text(exc), meter=label))
        return None
    status = "pass" if state == RelayState.CONNECTED else "warn"
    hint = "" if status == "pass" else "the customer is off supply: is that intended?"
    report.add(Check("relay", status, state.value, meter=label, expected="connected", hint=hint))
    return state


async def _energy(session: MeterSession, report: Report, label: str) -> None:
    try:
        (reading,) = await session.read_registers([IMPORT_ENERGY])
    except (MeterError, ValueError) as exc:
        report.add(Check("energy", "fail", error_text(exc), meter=label, expected="an import energy reading"))
        return
    report.add(Check("energy", "pass", f"{reading.value:.3f} {reading.unit}".strip(), meter=label,
                     expected="a first good read"))  # fmt: skip


async def _profile(session: MeterSession, report: Report, label: str, opts: Options, profile: Obis,
                   drift: float) -> None:  # fmt: skip
    # The meter stamps its profile in its own time: sample the window as its clock saw it.
    now = datetime.now(UTC) + timedelta(seconds=drift)
    step = opts.interval
    last = floor_to(now, step)
    since = last - timedelta(hours=opts.profile_hours)
    try:
        readings = await session.read_profile(profile, since, last)
    except Unsupported:
        report.add(Check("profile", "info", "no load profile in the meter (intervals come from register reads)",
                         meter=label))  # fmt: skip
        return
    except MeterError as exc:
        report.add(Check("profile", "fail", error_text(exc), meter=label))
        return
    expected = int((last - since) / step)
    got = len({r.timestamp for r in readings if r.value is not None and since < r.timestamp <= last})
    share = got / expected if expected else 1.0
    status = "pass" if share >= 1.0 else ("warn" if got else "fail")
    measured = f"{got}/{expected} intervals ({share:.0%}) in the last {opts.profile_hours:g} h"
    report.add(Check("profile", status, measured, meter=label, expected="100 %"))


class _Borrowed:
    """The session commissioning already holds, lent to the switching engine (not closed by it)."""

    def __init__(self, session: MeterSession) -> None:
        self.session = session

    async def __aenter__(self) -> MeterSession:
        return self.session

    async def __aexit__(self, *exc: object) -> None:
        return None


async def relay_test(session: MeterSession, report: Report, label: str, opts: Options, original: RelayState,
                     meter: Meter | None, registry: Registry | None) -> None:  # fmt: skip
    """Open and close (or close and open) through the switching journal and policy, ending as
    it was found. Not for a meter whose identity failed or that the registry does not book (its
    customer and protection are unknown), nor for a protected customer without --override."""
    failed = any(c.meter == label and c.name == "identity" and c.status == "fail" for c in report.checks)
    if meter is None or registry is None or failed:
        why = "identity check failed" if failed else "not in the registry (customer and protection unknown)"
        report.add(Check("relay_test", "warn", f"not switched: {why}", meter=label,
                         hint="sort out the registry entry, then test the relay"))  # fmt: skip
        return
    if meter.protected and opts.override is None:
        report.add(Check("relay_test", "warn", f"not switched: protected customer ({meter.protection})", meter=label,
                         hint="--override REASON tests it anyway (journaled)"))  # fmt: skip
        return
    # A test puts the relay back within seconds: the disconnect windows (there so a customer cut
    # off for arrears can pay the same day) do not apply; protection and the journal do.
    policy = SwitchingPolicy(opts.switching, windows=False)
    journal = CommandJournal(opts.state_dir / "journal.sqlite")
    engine = SwitchingEngine(journal, policy, registry, lambda _m: _Borrowed(session),  # type: ignore[arg-type,return-value]
                             confirm_timeout=opts.relay_confirm_s, poll_interval=0.2, attempts=1)  # fmt: skip
    first = RelayAction.DISCONNECT if original == RelayState.CONNECTED else RelayAction.RECONNECT
    second = RelayAction.RECONNECT if first == RelayAction.DISCONNECT else RelayAction.DISCONNECT
    roles = frozenset({OVERRIDE_ROLE}) if opts.override else frozenset()
    who = f"{COMMISSIONING}{opts.engineer or 'engineer'}"
    steps = []
    try:
        for action in (first, second):
            started = time.monotonic()
            command = await engine.execute(meter.id, action, who=who, why="commissioning test", roles=roles,
                                           override_reason=opts.override, defer=False)  # fmt: skip
            relay = command.evidence.get("relay_after", "?")
            steps.append(f"{action.value}: {relay} in {time.monotonic() - started:.1f} s (command {command.id[:8]})")
            if not command.state.startswith("confirmed"):
                report.add(Check("relay_test", "fail", "; ".join([*steps, f"{command.state}: {command.reason}"]),
                                 meter=label, expected=action.value,
                                 hint="the relay did not follow the command: stuck contact or wrong control mode"))
                return
            if meter.protected and command.state == CommandState.CONFIRMED_READY:
                report.add(Check("relay_test", "fail", "; ".join(steps), meter=label, expected="connected",
                                 hint=f"protected customer ({meter.protection}) left ready_for_reconnection: power "
                                      "stays off until someone presses the button; set the control mode"))  # fmt: skip
                return
    finally:
        journal.close()
    report.add(Check("relay_test", "pass", "; ".join(steps), meter=label, expected=f"back to {original.value}"))


async def _await_state(session: MeterSession, target: RelayState, seconds: float) -> RelayState:
    deadline = time.monotonic() + seconds
    state = await session.read_relay()
    while state != target and time.monotonic() < deadline:  # polling the meter is the confirmation
        await asyncio.sleep(0.2)
        state = await session.read_relay()
    return state
