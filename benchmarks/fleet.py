"""Full daily profile (96 intervals x 4 channels) + registers for as many DLMS meters as the
engine can read in the time given, simulators on the same machine.

The simulator runs in its own process (`python -m simulators.dlms_meter --meters N`, one TCP
wrapper port per meter); the polling engine (LLS association, clock, one day of profile by
range, the import register, outbox commit) reads meter after meter, `--concurrency` at a time.
The limit it is compared with, measured after it in the same run: the same sessions alone.

    python benchmarks/fleet.py [--meters 50] [--seconds 300] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from limits import dlms_sessions_alone

from headend.config import parse_config
from headend.protocols.dlms.client import DlmsSession
from headend.registry import Registry
from headend.scheduler.engine import PollingEngine
from headend.storage.outbox import Outbox
from simulators import launch

ROOT = Path(__file__).resolve().parent.parent


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--meters", type=int, default=50)
    p.add_argument("--seconds", type=float, default=300)
    p.add_argument("--concurrency", type=int, default=8)
    args = p.parse_args()
    sim, port_list = await launch.dlms_meters(args.meters)
    ports = {f"D{i}": port for i, port in enumerate(port_list)}
    cfg = parse_config({
        "links": [{"id": f"l{m}", "kind": "tcp", "protocol": "dlms-wrapper", "host": "127.0.0.1", "port": port}
                  for m, port in ports.items()],
        "meters": [{"id": m, "link": f"l{m}"} for m in ports],
        "plans": [{"id": "day", "read": ["clock", "profile", "registers"], "channels": ["1-0:1.8.0.255"],
                   "every": "1d", "history": "1d", "window": "1m"}],
    })  # fmt: skip
    plan = cfg.plans[0]
    with tempfile.TemporaryDirectory() as tmp:
        outbox = Outbox(Path(tmp) / "outbox.sqlite")

        def session(m: str) -> DlmsSession:
            return DlmsSession.tcp_wrapper("127.0.0.1", ports[m], m, authentication="lls", password=b"12345678")

        engine = PollingEngine(Registry(cfg), outbox, session)
        deadline = time.perf_counter() + args.seconds
        done = 0
        values = 0

        async def worker(k: int) -> None:
            nonlocal done, values
            i = k
            while time.perf_counter() < deadline:
                meter = f"D{i % args.meters}"
                result = await engine.read_meter(meter, plan, datetime.now(UTC), fresh=True)
                assert result.ok, result.error
                done += 1
                values += result.readings
                i += args.concurrency

        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(args.concurrency)))
        elapsed = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        outbox.close()
    limit = await dlms_sessions_alone(ports, args.concurrency, min(args.seconds, 15.0))
    sim.terminate()
    await sim.wait()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    head_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    sim_cpu = children.ru_utime + children.ru_stime
    rate, value_rate, head, simulator = done / elapsed, values / elapsed, head_cpu / elapsed, sim_cpu / elapsed
    print(
        f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs; "
        f"{args.meters} simulated DLMS meters (own process), concurrency {args.concurrency}, {elapsed:.0f} s"
    )
    print(f"  {done} meter-days read ({values} values): {rate:.1f} meters/s, {value_rate:,.0f} values/s")
    print(f"  CPU: head-end {head:.0%} of a core, simulator {simulator:.0%} of a core")
    print(f"  limit (same run): the DLMS sessions alone, {args.concurrency} at a time: {limit:.1f} meters/s; "
          f"ratio {rate / limit:.2f}")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
