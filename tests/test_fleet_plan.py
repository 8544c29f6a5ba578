"""Acceptance: 500 meters across three protocols on mixed links complete a plan, and a link
that is down opens its breaker while the others finish."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from headend.config import parse_config
from headend.localservers import MosquittoServer, free_port
from headend.protocols.modbus_maps import shipped_maps
from headend.registry import Registry
from headend.scheduler.engine import PollingEngine
from headend.sessions import SessionFactory
from headend.storage.outbox import Outbox
from simulators.clock import ManualClock
from simulators.dlms_meter import SimulatedDlmsMeter
from simulators.modbus_meter import ModbusSimulator, SimulatedMeter
from simulators.mqtt_concentrator import SimulatedConcentrator
from tests.test_scheduler import NOW


async def test_500_meters_on_three_protocols_complete_a_plan(tmp_path: Path, mosquitto_server: MosquittoServer) -> None:
    clock = ManualClock(NOW)
    run = uuid.uuid4().hex[:6]
    dlms = [SimulatedDlmsMeter(f"D{i}", clock, seed=i + 1) for i in range(200)]
    dlms_ports = [await m.start() for m in dlms]
    relay_map = shipped_maps()["sim-relay-meter"]
    gateways = [ModbusSimulator([SimulatedMeter(u, relay_map, clock) for u in range(1, 101)]) for _ in range(2)]
    gateway_ports = [free_port() for _ in gateways]
    for sim, port in zip(gateways, gateway_ports, strict=True):
        await sim.start_tcp("127.0.0.1", port)
    concentrators = {f"dc{k}-{run}": [f"dc{k}-{run}-m{n:02d}" for n in range(50)] for k in range(2)}
    fleet = [SimulatedConcentrator(c, "127.0.0.1", mosquitto_server.port, ms, clock) for c, ms in concentrators.items()]
    links: list[dict[str, object]] = [
        {"id": f"d{i}", "kind": "tcp", "protocol": "dlms-wrapper", "host": "127.0.0.1", "port": p, "timeout": "2s"}
        for i, p in enumerate(dlms_ports)
    ]
    links += [{"id": f"gw{g}", "kind": "tcp", "protocol": "modbus-tcp", "host": "127.0.0.1", "port": p,
               "timeout": "500ms"} for g, p in enumerate(gateway_ports)]  # fmt: skip
    links += [{"id": "broker", "kind": "mqtt", "host": "127.0.0.1", "port": mosquitto_server.port, "timeout": "3s"},
              {"id": "gw-down", "kind": "tcp", "protocol": "modbus-tcp", "host": "127.0.0.1", "port": free_port(),
               "timeout": "300ms"}]  # fmt: skip
    meters: list[dict[str, object]] = [{"id": f"D{i}", "link": f"d{i}", "groups": ["all"]} for i in range(200)]
    meters += [{"id": f"G{g}-{u}", "link": f"gw{g}", "address": u, "map": "sim-relay-meter", "groups": ["all"]}
               for g in range(2) for u in range(1, 101)]  # fmt: skip
    meters += [{"id": m, "concentrator": c, "groups": ["all"]} for c, ms in concentrators.items() for m in ms]
    meters += [{"id": f"X{u}", "link": "gw-down", "address": u, "map": "sim-relay-meter", "groups": ["all"]}
               for u in range(1, 6)]  # fmt: skip
    cfg = parse_config({
        "links": links, "meters": meters,
        "concentrators": [{"id": c, "link": "broker", "max_sessions": 8} for c in concentrators],
        "plans": [{"id": "registers", "select": {"group": "all"}, "read": ["registers"],
                   "channels": ["1-0:1.8.0.255"], "every": "15m", "window": "2m", "attempts": 2}],
    })  # fmt: skip
    outbox = Outbox(tmp_path / "outbox.sqlite")
    sessions = SessionFactory(cfg, outbox, state_dir=tmp_path, env={})
    await sessions.start()
    for dc in fleet:
        await dc.start()
    mqtt = sessions.mqtt["broker"]
    await mqtt.until(lambda: all(c in mqtt.concentrators and mqtt.concentrators[c].online for c in concentrators))

    async def no_wait(_seconds: float) -> None:
        return None

    engine = PollingEngine(Registry(cfg), outbox, sessions, sleep=no_wait, breaker_threshold=2)
    report = await engine.run_plan(cfg.plans[0], NOW)
    results = {r.meter: r for r in report.results}
    good = [m for m in results if not m.startswith("X")]
    assert len(good) == 500 and all(results[m].ok for m in good), [r.error for r in report.results if not r.ok][:3]
    assert not any(results[f"X{u}"].ok for u in range(1, 6))
    assert engine.breakers["gw-down"].state() == "open"
    assert sum("circuit open" in results[f"X{u}"].error for u in range(1, 6)) >= 3  # most never touched the line
    assert outbox.depth() == 500
    for dc in fleet:
        await dc.stop()
    await sessions.close()
    for sim in gateways:
        await sim.stop()
    for m in dlms:
        await m.stop()
    outbox.close()


async def test_a_plan_over_10000_meters_runs_on_a_worker_per_session_not_a_task_per_meter(tmp_path: Path) -> None:
    """Meters wait in a line per link, read by as many workers as the link carries sessions:
    what the event loop holds grows with the links, not with the meters."""
    links = [{"id": f"gw{g}", "kind": "tcp", "protocol": "modbus-tcp", "host": "127.0.0.1", "port": free_port(),
              "timeout": "300ms"} for g in range(50)]  # fmt: skip  # nothing listens: every link is down
    meters = [{"id": f"M{g}-{u}", "link": f"gw{g}", "address": u, "map": "sim-relay-meter", "groups": ["all"]}
              for g in range(50) for u in range(1, 201)]  # fmt: skip
    plan = {"id": "registers", "select": {"group": "all"}, "read": ["registers"], "channels": ["1-0:1.8.0.255"],
            "every": "15m", "window": "2m", "attempts": 1}
    cfg = parse_config({"links": links, "meters": meters, "plans": [plan]})
    outbox = Outbox(tmp_path / "outbox.sqlite")
    sessions = SessionFactory(cfg, outbox, state_dir=tmp_path, env={})
    await sessions.start()

    async def no_wait(_seconds: float) -> None:
        return None

    engine = PollingEngine(Registry(cfg), outbox, sessions, sleep=no_wait, breaker_threshold=2)
    tasks: list[int] = []
    report = await engine.run_plan(cfg.plans[0], NOW, on_result=lambda _r: tasks.append(len(asyncio.all_tasks())))
    assert len(report.results) == 10_000 and not any(r.ok for r in report.results)
    assert all(engine.breakers[f"gw{g}"].state() == "open" for g in range(50))
    # Direct TCP gateways share one cap of 64 sessions: 64 workers, whatever the fleet's size (a
    # connection attempt may hold a task of its own for a moment).
    assert max(tasks) <= 2 * 64 + 5, max(tasks)
    await sessions.close()
    outbox.close()
