"""The energies billing is done on: each a cumulative register and the energy of each
interval, validated alike (a PV customer is billed on import and export)."""

from __future__ import annotations

from dataclasses import dataclass

from headend.model import EXPORT_ENERGY, IMPORT_ENERGY, IMPORT_INTERVAL, Obis


@dataclass(frozen=True)
class Energy:
    name: str
    register: Obis  # cumulative, 1-0:x.8.0
    interval: Obis  # one recording interval's energy, 1-0:x.29.0
    unit: str
    demand: Obis  # the meter's own maximum demand register, 1-0:x.6.0
    #: The rules about a customer's consumption pattern (spike, high/low, prolonged zero,
    #: after disconnect) only mean something for import: export is zero every night.
    pattern_rules: bool = False


IMPORT = Energy("import", IMPORT_ENERGY, IMPORT_INTERVAL, "kWh", Obis(1, 0, 1, 6, 0), pattern_rules=True)
EXPORT = Energy("export", EXPORT_ENERGY, Obis(1, 0, 2, 29, 0), "kWh", Obis(1, 0, 2, 6, 0))
REACTIVE_IMPORT = Energy("reactive_import", Obis(1, 0, 3, 8, 0), Obis(1, 0, 3, 29, 0), "kvarh", Obis(1, 0, 3, 6, 0))
REACTIVE_EXPORT = Energy("reactive_export", Obis(1, 0, 4, 8, 0), Obis(1, 0, 4, 29, 0), "kvarh", Obis(1, 0, 4, 6, 0))
ENERGIES = {e.name: e for e in (IMPORT, EXPORT, REACTIVE_IMPORT, REACTIVE_EXPORT)}
PATTERN_RULES = frozenset({"spike", "high_low", "prolonged_zero", "after_disconnect"})
