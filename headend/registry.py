"""The registry: which meters exist, how each is reached, and the customer flags that matter."""

from __future__ import annotations

from headend.config import Concentrator, Config, Link, Meter, Selector


class UnknownMeter(KeyError):
    def __str__(self) -> str:
        return f"no meter {self.args[0]!r} in the registry"


class Registry:
    def __init__(self, config: Config) -> None:
        self._meters = {m.id: m for m in config.meters}
        self._links = {link.id: link for link in config.links}
        self._concentrators = {c.id: c for c in config.concentrators}

    def __len__(self) -> int:
        return len(self._meters)

    def meters(self) -> list[Meter]:
        return list(self._meters.values())

    def has(self, meter_id: str) -> bool:
        return meter_id in self._meters

    def meter(self, meter_id: str) -> Meter:
        try:
            return self._meters[meter_id]
        except KeyError:
            raise UnknownMeter(meter_id) from None

    def link_of(self, meter_id: str) -> Link:
        """The physical link a meter is reached over (a concentrator's MQTT link for meters behind one)."""
        meter = self.meter(meter_id)
        if meter.link is not None:
            return self._links[meter.link]
        return self._links[self.concentrator(meter.concentrator or "").link]

    def concentrator(self, concentrator_id: str) -> Concentrator:
        return self._concentrators[concentrator_id]

    def select(self, selector: Selector) -> list[Meter]:
        """Meters matching every field the selector sets."""
        chosen = []
        for meter in self._meters.values():
            if selector.meters is not None and meter.id not in selector.meters:
                continue
            if selector.group is not None and selector.group not in meter.groups:
                continue
            if selector.link is not None and selector.link not in (meter.link, meter.concentrator):
                continue
            if selector.protocol is not None and self.link_of(meter.id).protocol != selector.protocol:
                continue
            chosen.append(meter)
        return chosen
