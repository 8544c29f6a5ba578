"""Commissioning an MQTT data concentrator: broker reachable, birth seen, inventory against
the registry, then each meter behind it checked through the concentrator's commands."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import uuid
from pathlib import Path

from headend.commission.checks import Options, Progress, error_text, identity, ratio, session_checks
from headend.commission.report import Check, FoundMeter, Report
from headend.config import Meter, MqttLink
from headend.model import IMPORT_INTERVAL
from headend.protocols.base import MeterError
from headend.protocols.mqtt import ConcentratorLink
from headend.registry import Registry
from headend.storage.outbox import Outbox

HINTS = {
    "connect": "the broker does not answer: check host/port, credentials and the firewall",
    "birth": "no birth message: the concentrator is not connected to this broker, its id is different, or its "
             "MQTT settings (broker address, credentials, topic root) are wrong",
    "missing": "the concentrator does not list this meter: not wired to it, not yet discovered by it, or a "
               "different meter id in its configuration",
}  # fmt: skip


async def commission_mqtt(link: MqttLink, concentrator: str, registry: Registry | None, opts: Options,
                          report: Report, progress: Progress) -> None:  # fmt: skip
    password = os.environ.get(link.password_env) if link.password_env else None
    registered = {m.address if isinstance(m.address, str) else m.id: m for m in (registry.meters() if registry else [])
                  if m.concentrator == concentrator}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="headend-commission-") as tmp:
        outbox = Outbox(Path(tmp) / "outbox.sqlite")  # the observer stores nothing; the link wants one
        observer = ConcentratorLink(link.host, link.port, outbox, headend_id=f"commission-{uuid.uuid4().hex[:8]}",
                                    username=link.username, password=password, observer=True, tls=link.tls_context(),
                                    command_timeout=link.timeout.total_seconds(),
                                    multipliers={key: m.multiplier for key, m in registered.items()})  # fmt: skip
        try:
            async with observer:
                await _run(observer, link, concentrator, registered, registry, opts, report, progress)
        finally:
            outbox.close()


async def _run(observer: ConcentratorLink, link: MqttLink, concentrator: str, registered: dict[str, Meter],
               registry: Registry | None, opts: Options, report: Report, progress: Progress) -> None:  # fmt: skip
    started = time.monotonic()
    try:
        await asyncio.wait_for(observer.connected.wait(), link.timeout.total_seconds())
    except TimeoutError:
        report.add(Check("connect", "fail", f"no connection to {link.host}:{link.port} within "
                         f"{link.timeout.total_seconds():g} s", hint=HINTS["connect"]))  # fmt: skip
        return
    took = (time.monotonic() - started) * 1000
    report.add(Check("connect", "pass", f"broker {link.host}:{link.port} in {took:.0f} ms"))
    progress(0, 1, f"waiting for {concentrator}'s birth")

    def online() -> bool:
        state = observer.concentrators.get(concentrator)
        return state is not None and state.online

    try:
        if not online():
            await observer.until(online, opts.birth_timeout)
    except TimeoutError:
        seen = observer.concentrators.get(concentrator)
        measured = "offline (its last will)" if seen is not None else f"no birth within {opts.birth_timeout:g} s"
        report.add(Check("birth", "fail", measured, expected=f"{concentrator} online", hint=HINTS["birth"]))
        return
    finally:
        progress(1, 1, "done")
    state = observer.concentrators[concentrator]
    report.add(Check("birth", "pass", f"{concentrator} online, firmware {state.firmware or '?'}, "
                     f"{len(state.meters)} meter(s) in its inventory"))  # fmt: skip
    for meter_id, meter in registered.items():
        if meter_id not in state.meters:
            report.add(Check("discovery", "fail", f"{meter_id} not in {concentrator}'s inventory", meter=meter.id,
                             expected=f"meter {meter.id}", hint=HINTS["missing"]))  # fmt: skip
    for meter_id, item in state.meters.items():
        expected = registered.get(meter_id)
        label = expected.id if expected else meter_id
        found = FoundMeter(f"{concentrator}/{meter_id}", "mqtt", serial=item.serial, model=item.model)
        report.meters.append(found)
        identity(report, label, found, expected, registry)
        ratio(report, label, None, expected, "concentrators do not report the meter's transformer ratio")
        try:
            async with observer.session(meter_id, concentrator) as session:
                await session_checks(session, report, label, opts, profile=IMPORT_INTERVAL, meter=expected,
                                     registry=registry)
        except MeterError as exc:  # one meter's trouble is reported, the rest still get checked
            report.add(Check("session", "fail", error_text(exc), meter=label))
