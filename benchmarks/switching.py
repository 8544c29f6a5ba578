"""Confirmed switching commands per second, and latency, for 1,000 meters.

Five Modbus simulators of 200 relay meters each (the simulator in its own process per
line), one ModbusLink per line, the switching engine and runner in this process: every
meter is disconnected (policy, journal, send, read-back, evidence), then reconnected.
Latency is from the request to the confirmed state in the journal.

    python benchmarks/switching.py [--lines 5] [--per-line 200]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from headend.config import parse_config
from headend.localservers import free_port
from headend.model import RelayAction
from headend.protocols.modbus import ModbusLink
from headend.protocols.modbus_maps import shipped_maps
from headend.registry import Registry
from headend.switching.engine import SwitchingEngine
from headend.switching.journal import CommandJournal, CommandState
from headend.switching.policy import SwitchingPolicy
from headend.switching.runner import CommandRunner

ROOT = Path(__file__).resolve().parent.parent
MONDAY_10 = datetime(2026, 3, 9, 10, 0, tzinfo=UTC)


async def start_line(units: int) -> tuple[int, asyncio.subprocess.Process]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "simulators.modbus_meter", "--map", "sim-relay-meter", "--units", f"1-{units}",
        "--tcp", f"127.0.0.1:{port}", cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    await proc.stdout.readline()  # printed once it listens
    return port, proc


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lines", type=int, default=5)
    p.add_argument("--per-line", type=int, default=200)
    args = p.parse_args()
    lines = [await start_line(args.per_line) for _ in range(args.lines)]
    meter_map = shipped_maps()["sim-relay-meter"]
    links = [ModbusLink.tcp("127.0.0.1", port, timeout=2) for port, _ in lines]
    where: dict[str, tuple[ModbusLink, int]] = {}
    meters: list[dict[str, Any]] = []
    for li in range(len(lines)):
        for unit in range(1, args.per_line + 1):
            meter_id = f"L{li}-U{unit:03d}"
            where[meter_id] = (links[li], unit)
            meters.append({"id": meter_id, "link": f"line{li}", "address": unit, "map": "sim-relay-meter"})
    cfg = parse_config({
        "links": [{"id": f"line{li}", "kind": "tcp", "protocol": "modbus-tcp", "host": "127.0.0.1", "port": port}
                  for li, (port, _) in enumerate(lines)],
        "meters": meters,
    })  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        journal = CommandJournal(Path(tmp) / "journal.sqlite")
        engine = SwitchingEngine(
            journal, SwitchingPolicy(cfg.switching), Registry(cfg),
            lambda m: where[m][0].session(m, where[m][1], meter_map),
            confirm_timeout=5, poll_interval=0.05, now=lambda: MONDAY_10,
        )  # fmt: skip
        runner = CommandRunner(engine, workers=4 * args.lines)
        await runner.start()
        print(f"{platform.python_implementation()} {platform.python_version()}; {len(meters)} relay meters on "
              f"{args.lines} Modbus TCP lines (simulators in their own processes)")  # fmt: skip
        for action in (RelayAction.DISCONNECT, RelayAction.RECONNECT):
            t0 = time.perf_counter()
            requested = {}
            for m in meters:
                command = engine.request(m["id"], action, who="bench", why="benchmark")
                requested[command.id] = time.time_ns()
                runner.submit(command)
            await runner.join()
            elapsed = time.perf_counter() - t0
            done = [journal.get(cid) for cid in requested]
            confirmed = [c for c in done if c.state == CommandState.CONFIRMED]
            latencies = sorted((c.updated_ns - requested[c.id]) / 1e6 for c in confirmed)
            p50 = statistics.median(latencies)
            p99 = latencies[int(len(latencies) * 0.99) - 1]
            print(f"  {action.value:10s}: {len(confirmed)}/{len(done)} confirmed in {elapsed:.1f}s = "
                  f"{len(confirmed) / elapsed:.0f}/s; latency p50 {p50:.0f} ms, p99 {p99:.0f} ms")  # fmt: skip
        await runner.stop()
        journal.close()
    for link in links:
        link.close()
    for _, proc in lines:
        proc.terminate()
        await proc.wait()


if __name__ == "__main__":
    asyncio.run(main())
