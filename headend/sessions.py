"""MeterSessions for any registry meter, whatever its protocol; owns the shared links.

Modbus lines and MQTT brokers are shared by all meters on them (one ModbusLink per line,
one ConcentratorLink per broker); DLMS sessions are opened per use. Secrets (LLS passwords,
HLS keys) come from the environment the config names.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

from headend.config import Config, MqttLink, SerialLink, TcpLink
from headend.installation import dlms_system_title, installation_id
from headend.protocols.base import MeterSession, Unsupported
from headend.protocols.dlms.security import InvocationCounters
from headend.protocols.modbus import ModbusLink
from headend.protocols.modbus_maps import find_map
from headend.protocols.mqtt import ConcentratorLink
from headend.registry import Registry
from headend.storage.outbox import Outbox
from headend.supervisor import Supervisor


class SessionFactory:
    def __init__(self, config: Config, outbox: Outbox, *, state_dir: Path, env: Mapping[str, str] | None = None,
                 headend_id: str | None = None, supervisor: Supervisor | None = None) -> None:  # fmt: skip
        self.supervisor = supervisor
        self.config = config
        self.registry = Registry(config)
        self.outbox = outbox
        self.env = os.environ if env is None else env
        self.counters = InvocationCounters(state_dir / "invocation_counters.sqlite")
        self.modbus: dict[str, ModbusLink] = {}
        self.mqtt: dict[str, ConcentratorLink] = {}
        self.headend_id = headend_id or installation_id(state_dir)
        self.system_title = dlms_system_title(state_dir, config.dlms.system_title)

    async def start(self) -> None:
        """Connect to every MQTT broker that has concentrators (reads arrive by themselves)."""
        for link in self.config.links:
            if isinstance(link, MqttLink) and any(c.link == link.id for c in self.config.concentrators):
                mqtt = ConcentratorLink.from_config(link, self.outbox, self.config, self.env,
                                                    headend_id=self.headend_id, supervisor=self.supervisor)  # fmt: skip
                await mqtt.__aenter__()
                self.mqtt[link.id] = mqtt
                # Subscribed before anything else starts; a broker that is down is retried in the background.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(mqtt.connected.wait(), link.timeout.total_seconds())

    async def close(self) -> None:
        for mqtt in self.mqtt.values():
            with contextlib.suppress(Exception):
                await mqtt.stop()
        for modbus in self.modbus.values():
            modbus.close()
        self.counters.close()

    def link_states(self) -> dict[str, str]:
        states = {link_id: ("up" if m.client.connected else "down") for link_id, m in self.modbus.items()}
        states |= {link_id: ("up" if m.connected.is_set() else "down") for link_id, m in self.mqtt.items()}
        return states

    def __call__(self, meter_id: str) -> MeterSession:
        meter = self.registry.meter(meter_id)
        link = self.registry.link_of(meter_id)
        if meter.concentrator is not None:
            if link.id not in self.mqtt:
                raise Unsupported(f"broker link {link.id} is not connected", meter=meter_id)
            return self.mqtt[link.id].session(meter_id, meter.concentrator)
        assert isinstance(link, TcpLink | SerialLink)
        if link.protocol.startswith("dlms"):
            # Imported at the first DLMS session: dlms-cosem costs 0.15 s of start-up that a
            # site without DLMS meters never needs, and a restart should answer its API at once.
            from headend.protocols.dlms.client import DlmsSession

            return DlmsSession.from_config(meter, link, self.env, counters=self.counters,
                                           system_title=self.system_title,
                                           max_get_bytes=self.config.dlms.max_get_bytes,
                                           max_get_blocks=self.config.dlms.max_get_blocks)  # fmt: skip
        if meter.map is None or meter.address is None:
            raise Unsupported("a Modbus meter needs a map and an address (unit id)", meter=meter_id)
        if link.id not in self.modbus:
            self.modbus[link.id] = ModbusLink.from_config(link)
        return self.modbus[link.id].session(
            meter_id, int(meter.address), find_map(meter.map),
            ct=meter.ct.factor if meter.ct else 1.0, pt=meter.pt.factor if meter.pt else 1.0,
        )  # fmt: skip
