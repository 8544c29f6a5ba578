"""What a simulated meter measures, as a function of (simulated) time.

Power follows a day-shaped curve; energy is its exact integral, so registers only grow and
interval sums equal register differences; an open relay stops the flow of energy from the
moment it opens to the moment it closes, and never changes what was measured before (the
history of a meter is immutable, as a real meter's is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from headend.model import Obis

DAY = 86_400.0
ENERGY_IMPORT = Obis(1, 0, 1, 8, 0)
ENERGY_EXPORT = Obis(1, 0, 2, 8, 0)
_PHASE_VOLTAGE = {Obis(1, 0, 32, 7, 0): 0, Obis(1, 0, 52, 7, 0): 1, Obis(1, 0, 72, 7, 0): 2}
_PHASE_CURRENT = {Obis(1, 0, 31, 7, 0): 0, Obis(1, 0, 51, 7, 0): 1, Obis(1, 0, 71, 7, 0): 2}
_PHASE_POWER = {Obis(1, 0, 36, 7, 0): 0, Obis(1, 0, 56, 7, 0): 1, Obis(1, 0, 76, 7, 0): 2}
TOTAL_POWER = Obis(1, 0, 16, 7, 0)
FREQUENCY = Obis(1, 0, 14, 7, 0)


@dataclass
class LoadModel:
    """A consumer's meter: energy since `t0` (epoch seconds) on top of `energy_start_kwh`."""

    t0: float
    seed: int = 1
    base_power_w: float = 3000.0
    energy_start_kwh: float = 12_345.0
    relay_connected: bool = True
    #: When the relay was open: (opened, closed or None while it still is).
    _open: list[tuple[float, float | None]] = field(default_factory=list, repr=False)

    @property
    def _phi(self) -> float:
        return ((self.seed * 0.37) % 1.0) * 2 * math.pi

    def _flowed_kwh(self, t: float) -> float:
        """Energy of P(t) = P0 (1 + 0.5 sin(w t + phi)) from t0 to t, relay ignored."""
        w = 2 * math.pi / DAY
        p0 = self.base_power_w
        joules = p0 * (t - self.t0) + 0.5 * p0 / w * (math.cos(w * self.t0 + self._phi) - math.cos(w * t + self._phi))
        return joules / 3.6e6

    def import_kwh(self, t: float) -> float:
        """The register at t: what flowed up to t, less what did not flow while the relay was
        open before t (an opening after t changes nothing at t)."""
        lost = 0.0
        for opened, closed in self._open:
            if opened < t:
                lost += self._flowed_kwh(min(t, closed if closed is not None else t)) - self._flowed_kwh(opened)
        return self.energy_start_kwh + self._flowed_kwh(t) - lost

    def connected_at(self, t: float) -> bool:
        return not any(opened <= t and (closed is None or t < closed) for opened, closed in self._open)

    def export_kwh(self, t: float) -> float:
        return 10.0 + self.seed  # a consumer: export stays put

    def power_w(self, t: float) -> float:
        if not self.connected_at(t):
            return 0.0
        return self.base_power_w * (1 + 0.5 * math.sin(2 * math.pi * t / DAY + self._phi))

    def voltage_v(self, t: float, phase: int) -> float:
        return 230.0 + 3.0 * math.sin(2 * math.pi * t / 3600 + phase)

    def set_relay(self, connected: bool, t: float) -> None:
        if connected == self.relay_connected:
            return
        if connected and self._open and self._open[-1][1] is None:
            self._open[-1] = (self._open[-1][0], t)
        elif not connected:
            self._open.append((t, None))
        self.relay_connected = connected

    def value(self, obis: Obis, t: float) -> float:
        """The true value of a measurand in W, V, A, Hz or kWh."""
        if obis == ENERGY_IMPORT:
            return self.import_kwh(t)
        if obis == ENERGY_EXPORT:
            return self.export_kwh(t)
        if obis in _PHASE_VOLTAGE:
            return self.voltage_v(t, _PHASE_VOLTAGE[obis])
        if obis in _PHASE_POWER:
            return self.power_w(t) / 3
        if obis in _PHASE_CURRENT:
            return self.power_w(t) / 3 / self.voltage_v(t, _PHASE_CURRENT[obis])
        if obis == TOTAL_POWER:
            return self.power_w(t)
        if obis == FREQUENCY:
            return 50.0 + 0.02 * math.sin(2 * math.pi * t / 600)
        raise KeyError(f"the simulator has no physics for {obis}")
