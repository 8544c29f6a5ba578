"""Acceptance at fleet scale: 10 concentrators x 100 meters, a simulated day, into a real influxd."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from pathlib import Path

from headend.localservers import MosquittoServer
from headend.model import IMPORT_INTERVAL
from headend.protocols.mqtt import ConcentratorLink
from headend.storage.influx import InfluxStore
from headend.storage.outbox import Outbox
from headend.storage.writer import BatchWriter
from simulators.clock import ManualClock
from simulators.mqtt_concentrator import SimulatedConcentrator
from tests.factories import T0

DAY = timedelta(days=1)


async def test_ten_concentrators_of_100_meters_land_a_whole_day_in_influxdb(
    tmp_path: Path, mosquitto_server: MosquittoServer, influx_store: InfluxStore
) -> None:
    clock = ManualClock(T0)
    run = uuid.uuid4().hex[:6]
    outbox = Outbox(tmp_path / "outbox.sqlite")
    writer = BatchWriter(outbox, influx_store, batch_size=5000)
    writer_task = asyncio.create_task(writer.run())
    fleet = [
        SimulatedConcentrator(f"dc{k}-{run}", "127.0.0.1", mosquitto_server.port,
                              [f"dc{k}-{run}-m{n:03d}" for n in range(100)], clock)
        for k in range(10)
    ]  # fmt: skip
    async with ConcentratorLink("127.0.0.1", mosquitto_server.port, outbox, headend_id=f"he-{run}") as link:
        await link.connected.wait()
        for dc in fleet:
            await dc.start()
        await link.until(lambda: all(dc.id in link.concentrators for dc in fleet))
        clock.advance(DAY.total_seconds())
        await asyncio.gather(*(dc.publish_until(clock.datetime()) for dc in fleet))
        # A day of quarter hours, and each meter's register frozen at the closing midnight.
        await link.until(lambda: link.stats.accepted_readings == 10 * 100 * 96 + 10 * 100, timeout=120)
        assert link.stats.gaps == 0 and link.stats.bad_messages == 0
        for dc in fleet:
            await dc.stop()
    async with asyncio.timeout(120):
        await writer.wait_drained()
    writer.stop()
    await writer_task
    assert await influx_store.count() == 96_000 and await influx_store.count("register") == 1_000
    incomplete = []
    for dc in fleet:
        for meter, load in dc.loads.items():
            got = await influx_store.query(meter, IMPORT_INTERVAL, T0, T0 + DAY)
            if len(got) != 96:
                incomplete.append((meter, len(got)))
            day_kwh = load.import_kwh((T0 + DAY).timestamp()) - load.import_kwh(T0.timestamp())
            assert abs(sum(r.value or 0 for r in got) - day_kwh) < 96 * 0.0005 + 1e-9
    assert incomplete == [], f"{len(incomplete)} meters incomplete"
    outbox.close()
