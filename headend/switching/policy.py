"""Switching policy: who may cut whom off, and when. Evaluated when a command is requested
AND again immediately before its relay is operated (windows close, registries change).

- Protected customers (hospital, water, gas, rail, military ...) are never disconnected
  unless that very request carries an override with a reason AND its principal holds the
  override role. Holding the role is not enough: bulk lists and billing events never
  override implicitly.
- Disconnects only inside the configured local-time windows and never on holidays, so a
  customer can still pay and be reconnected the same day. Outside them a disconnect waits
  for the next opening (deferred) unless the request asks not to wait.
- Reconnects are allowed at any time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo

from headend.config import Meter, SwitchingConfig
from headend.model import RelayAction

OVERRIDE_ROLE = "override"


class Refusal(StrEnum):
    """Machine-readable reasons a command is not run (as `code` in the API)."""

    PROTECTED = "protected"
    OVERRIDE_FORBIDDEN = "override_forbidden"
    OUTSIDE_WINDOW = "outside_window"
    HOLIDAY = "holiday"
    NO_WINDOW = "no_window"
    OPEN_COMMAND = "open_command"
    EXPIRED = "expired"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    code: str = ""
    #: Refused for the time being: the next window opening (the command may wait for it).
    not_before: datetime | None = None


class SwitchingPolicy:
    def __init__(self, config: SwitchingConfig, *, windows: bool = True) -> None:
        """`windows=False`: for a commissioning relay test, which puts the relay back within
        seconds; windows exist so a customer cut off for arrears can pay the same day."""
        self.config = config
        self.tz = ZoneInfo(config.timezone)
        self.windows = windows

    def in_window(self, now: datetime) -> bool:
        local = now.astimezone(self.tz)
        if local.date() in self.config.holidays:
            return False
        return any(start <= local < end for start, end in self._windows_on(local.date()))

    def _windows_on(self, day: date) -> list[tuple[datetime, datetime]]:
        out = []
        for window in self.config.disconnect_windows:
            if day.weekday() in window.weekdays():
                start = datetime.combine(day, time.fromisoformat(window.start), self.tz)
                out.append((start, datetime.combine(day, time.fromisoformat(window.end), self.tz)))
        return out

    def next_opening(self, now: datetime) -> datetime | None:
        """The first moment at or after `now` inside a window, within `max_defer`."""
        local = now.astimezone(self.tz)
        limit = now + self.config.max_defer
        day = local.date()
        while datetime.combine(day, time(0), self.tz) <= limit:
            if day not in self.config.holidays:
                for start, end in sorted(self._windows_on(day)):
                    if end > local and start <= limit:
                        return max(start, local)
            day += timedelta(days=1)
        return None

    def decide(self, meter: Meter, action: RelayAction, now: datetime, roles: frozenset[str],
               override_reason: str | None = None) -> Decision:  # fmt: skip
        if action == RelayAction.RECONNECT:
            return Decision(True, "reconnects are allowed at any time")
        if override_reason is not None and OVERRIDE_ROLE not in roles:
            return Decision(False, "an override needs the override role", Refusal.OVERRIDE_FORBIDDEN)
        if meter.protected and override_reason is None:
            why = f"protected customer ({meter.protection}): disconnecting needs an override with a reason"
            return Decision(False, why, Refusal.PROTECTED)
        if self.windows and not self.in_window(now):
            local = now.astimezone(self.tz)
            windows = "; ".join(f"{w.days} {w.start}-{w.end}" for w in self.config.disconnect_windows)
            holiday = local.date() in self.config.holidays
            why = "a holiday" if holiday else f"outside {windows} ({self.config.timezone})"
            opening = self.next_opening(now)
            reason = f"disconnects are not allowed at {local:%a %Y-%m-%d %H:%M}: {why}"
            if opening is None:
                reason += f"; no window opens within {self.config.max_defer}"
                return Decision(False, reason, Refusal.NO_WINDOW)
            reason += f"; next window opens {opening.astimezone(self.tz):%a %Y-%m-%d %H:%M}"
            return Decision(False, reason, Refusal.HOLIDAY if holiday else Refusal.OUTSIDE_WINDOW, opening)
        if meter.protected:
            return Decision(True, f"protected customer ({meter.protection}) disconnected under override: "
                                  f"{override_reason}")  # fmt: skip
        return Decision(True, "inside the disconnect window")
