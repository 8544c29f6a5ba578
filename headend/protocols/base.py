"""What the scheduler and switching see of any meter, whatever the protocol.

Protocol errors map onto one small hierarchy so retry policy is decided in one place:
`LinkDown` and `Timeout` are worth a retry, `Refused` and `Unsupported` are not,
`BadFrame` ends the session (the peer or the line is sending garbage).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

from headend.model import Obis, Reading, RelayAction, RelayState


class MeterError(Exception):
    """Base of every protocol error; `meter` names the meter it happened with."""

    retryable = False

    def __init__(self, message: str, *, meter: str | None = None) -> None:
        super().__init__(f"{meter}: {message}" if meter else message)
        self.meter = meter


class LinkDown(MeterError):
    """The link (socket, serial port, broker, concentrator) is not there."""

    retryable = True


class Timeout(MeterError):
    """The meter did not answer within the configured time."""

    retryable = True


class Refused(MeterError):
    """The meter answered no: wrong password, access denied, association rejected."""


class BadFrame(MeterError):
    """The meter sent bytes that do not parse; `raw` keeps them for the log."""

    def __init__(self, message: str, *, meter: str | None = None, raw: bytes = b"") -> None:
        super().__init__(f"{message} (raw {raw[:64].hex()}{'...' if len(raw) > 64 else ''})", meter=meter)
        self.raw = raw


class Unsupported(MeterError):
    """The meter or its map does not offer the object or operation asked for."""


@runtime_checkable
class MeterSession(Protocol):
    """An open session with one meter. Use as `async with driver.session(meter) as s:`."""

    meter: str
    #: The profile's rows carry the stamps of the clock `read_clock` reads, so a measured
    #: offset places them (a meter's own profile). False where another device stamps them
    #: (a concentrator stamps its meters' intervals with its own clock).
    profile_on_meter_clock: bool

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def read_registers(self, channels: Sequence[Obis]) -> list[Reading]: ...

    async def read_profile(self, profile: Obis, since: datetime, until: datetime | None = None) -> list[Reading]: ...

    async def read_events(self, since: datetime, until: datetime | None = None) -> list[Reading]:
        """Event log entries with since < t <= until (kind "event", value = event code)."""
        ...

    async def read_billing(self, since: datetime, until: datetime | None = None) -> list[Reading]:
        """Registers the meter froze at each billing period's end (day, month), since < t <= until,
        as register readings whose source names where they come from."""
        ...

    async def read_clock(self) -> datetime: ...

    async def set_clock(self, t: datetime) -> None: ...

    async def read_relay(self) -> RelayState: ...

    async def operate_relay(self, action: RelayAction) -> None: ...
