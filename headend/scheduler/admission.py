"""One link admission for every kind of work that talks to a meter.

Polling, on-demand reads, VEE re-reads, switching and commissioning all open their meter
sessions here, so a link's limits hold whoever asks: a serial line or an HDLC bus carries
one session at a time, a concentrator `max_sessions`, direct TCP meters share a global cap.
Waiters are served by lane (switching > on-demand > backfill > bulk); a plan's bulk read
takes a slot per meter, so a switching command waits at most for the meter being read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from headend.config import TcpLink
from headend.protocols.base import MeterSession
from headend.registry import Registry
from headend.scheduler.gate import Lane, LinkGate


class LinkAdmission:
    def __init__(self, registry: Registry, sessions: Callable[[str], MeterSession], *, tcp_sessions: int = 64) -> None:
        self.registry = registry
        self.sessions = sessions
        self._tcp_gate = LinkGate(tcp_sessions)  # direct TCP meters share one global cap
        self._gates: dict[str, LinkGate] = {}

    def gate(self, meter_id: str) -> tuple[str, LinkGate]:
        """The gate a meter's sessions pass, and the key of what it guards (link or concentrator)."""
        meter = self.registry.meter(meter_id)
        link = self.registry.link_of(meter_id)
        if meter.concentrator is not None:
            key = meter.concentrator
            capacity = self.registry.concentrator(key).max_sessions
        elif isinstance(link, TcpLink) and link.protocol != "dlms-hdlc":
            return link.id, self._tcp_gate if link.max_sessions == 1 else self._gate(link.id, link.max_sessions)
        else:
            key, capacity = link.id, 1  # one session at a time on a serial line or an HDLC bus
        return key, self._gate(key, capacity)

    def _gate(self, key: str, capacity: int) -> LinkGate:
        if key not in self._gates:
            self._gates[key] = LinkGate(capacity)
        return self._gates[key]

    @asynccontextmanager
    async def session(self, meter_id: str, lane: Lane) -> AsyncIterator[MeterSession]:
        """A slot on the meter's link in `lane`, then an open session; both released on exit."""
        _key, gate = self.gate(meter_id)
        async with gate.slot(lane), self.sessions(meter_id) as session:
            yield session
