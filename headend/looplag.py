"""How late the event loop runs what is due: the one figure that shows a server doing too
much at once on its loop (a long stall delays every read, command and API answer)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

#: Often enough to see a stall of tens of ms, rarely enough to cost nothing.
PERIOD = 0.05


async def watch_lag(observe: Callable[[float], None], stop: asyncio.Event, period: float = PERIOD) -> None:
    """Call `observe(seconds late)` every `period` until `stop` is set."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        due = loop.time() + period
        await asyncio.sleep(period)
        observe(max(0.0, loop.time() - due))
