"""Billing-grade data from `headend serve` as deployed (issue #15)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

from simulators.clock import Clock
from simulators.dlms_meter import HdlcBus, SimulatedDlmsMeter
from simulators.ptypair import NullModem
from tests.conftest import Spawn
from tests.test_switching_serve import serve

STEP = timedelta(minutes=15)


def floor_quarter(t: datetime) -> datetime:
    return t - (t - datetime(1970, 1, 1, tzinfo=UTC)) % STEP


async def test_a_real_outage_costs_a_bounded_number_of_re_reads_and_its_neighbour_is_read_every_run(
    tmp_path: Path, spawn: Spawn
) -> None:
    """With validation on arrival (the default), an outage the meter really had is asked
    again `reread_attempts` times at most, not once per validation; the healthy meter on
    the same bus is read every run."""
    clock = Clock()
    outage, healthy = SimulatedDlmsMeter("G16", clock, seed=16), SimulatedDlmsMeter("H17", clock, seed=17)
    last = floor_quarter(clock.datetime()) - STEP
    outage.power_outage(last - 3 * STEP, last)  # a permanent hour of nothing
    bus = HdlcBus({16: outage, 17: healthy})
    with NullModem() as modem:
        await bus.start_serial(modem.a)
        body = f"""
[vee]
reread_attempts = 3
reread_spacing = "1s"
[[links]]
id = "rs485"
kind = "serial"
protocol = "dlms-hdlc"
device = "{modem.b}"
timeout = "5s"
""" + "".join(f"""[[meters]]
id = "{name}"
link = "rs485"
groups = ["bus"]
dlms = {{ authentication = "lls", password_env = "BUS_PASSWORD", physical = {a} }}
""" for a, name in ((16, "G16"), (17, "H17"))) + """
[[plans]]
id = "profiles"
select = { group = "bus" }
read = ["profile"]
every = "1s"
window = "1s"
history = "3h"
"""
        served = await serve(tmp_path, spawn, body, BUS_PASSWORD="12345678")
        try:
            async with asyncio.timeout(90):
                while healthy.associations < 12:  # noqa: ASYNC110 - another process reads the meters
                    await asyncio.sleep(0.1)
        finally:
            await served.stop()
            await bus.stop()
    with contextlib.closing(sqlite3.connect(tmp_path / "state" / "vee.sqlite")) as db:
        asked = dict(db.execute("SELECT meter, max(attempts) FROM rereads GROUP BY meter"))
    assert asked.get("G16") == 3, "the outage was asked again exactly reread_attempts times"
    extra = outage.associations - healthy.associations
    assert extra <= 3, f"{outage.associations} associations on the outage meter, {healthy.associations} beside it"
