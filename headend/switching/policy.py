"""Switching policy: who may cut whom off, and when.

- Protected customers (hospital, water, gas, rail, military ...) are never disconnected
  unless the request carries the override role; the decision is journaled either way.
- Disconnects only inside the configured local-time windows and never on holidays, so a
  customer can still pay and be reconnected the same day.
- Reconnects are allowed at any time.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time
from zoneinfo import ZoneInfo

from headend.config import Meter, SwitchingConfig
from headend.model import RelayAction

OVERRIDE_ROLE = "override"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str


class SwitchingPolicy:
    def __init__(self, config: SwitchingConfig) -> None:
        self.config = config
        self.tz = ZoneInfo(config.timezone)

    def in_window(self, now: datetime) -> bool:
        local = now.astimezone(self.tz)
        if local.date() in self.config.holidays:
            return False
        for window in self.config.disconnect_windows:
            start, end = time.fromisoformat(window.start), time.fromisoformat(window.end)
            if local.weekday() in window.weekdays() and start <= local.time() < end:
                return True
        return False

    def decide(self, meter: Meter, action: RelayAction, now: datetime, roles: frozenset[str]) -> Decision:
        if action == RelayAction.RECONNECT:
            return Decision(True, "reconnects are allowed at any time")
        if meter.protected and OVERRIDE_ROLE not in roles:
            return Decision(False, f"protected customer ({meter.protection}): disconnecting needs the override role")
        if not self.in_window(now):
            local = now.astimezone(self.tz)
            windows = "; ".join(f"{w.days} {w.start}-{w.end}" for w in self.config.disconnect_windows)
            why = "a holiday" if local.date() in self.config.holidays else f"outside {windows} ({self.config.timezone})"
            return Decision(False, f"disconnects are not allowed at {local:%a %Y-%m-%d %H:%M}: {why}")
        if meter.protected:
            return Decision(True, f"protected customer ({meter.protection}) disconnected under override")
        return Decision(True, "inside the disconnect window")
