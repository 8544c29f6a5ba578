"""Event-loop lag of `headend serve` while one plan runs over 100,000 meters.

The site: 500 Modbus TCP gateways of 200 meters each. Ten of them are real (the Modbus
simulator, its own process per gateway, relay meters), the other 490 are down (nothing
listens on their ports): the run reads 2,000 meters for real and gives up on 98,000, whose
links' circuit breakers open after their first failures, as on a site where a region lost
its backhaul. Every meter has its boundary-read cursor in the outbox before serve starts
(200,000 cursor rows), so each real read looks its cursor up among them.

The plan reads the energy register at the interval boundary (these meters keep no load
profile: intervals are made from two boundary reads). serve measures its own loop lag (a
timer due every 50 ms, `headend_event_loop_lag_seconds`); the figures are read from /metrics
once the run has finished (asked every 5 s meanwhile, as a scraper would: rendering /metrics with 500 links is a
cost of its own). The limit it is compared with is the issue's target: p99 < 20 ms, max < 100 ms.

    python benchmarks/plan_scale.py [--gateways 500] [--real 10] [--per-gateway 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from serving import loop_lag, metric, start_serve, until_healthy

from headend.localservers import free_port
from headend.storage.outbox import Outbox
from simulators import launch

POLL = 5.0


def site(work: Path, api: int, ports: list[int], per_gateway: int) -> str:
    out = [f'state_dir = "{work / "state"}"\n[storage]\nbackend = "sqlite"\noutbox = "{work / "outbox.sqlite"}"\n'
           f'[storage.sqlite]\npath = "{work / "readings.sqlite"}"\n[api]\nport = {api}\n'
           '[[plans]]\nid = "boundary"\nread = ["profile"]\nevery = "1m"\nwindow = "5m"\nattempts = 1\n'
           'history = "1d"\n']  # fmt: skip
    for g, port in enumerate(ports):
        out.append(f'[[links]]\nid = "gw{g}"\nkind = "tcp"\nprotocol = "modbus-tcp"\nhost = "127.0.0.1"\n'
                   f'port = {port}\ntimeout = "1s"\n')  # fmt: skip
    for g in range(len(ports)):
        out.extend(f'[[meters]]\nid = "M{g}-{u}"\nlink = "gw{g}"\naddress = {u}\nmap = "sim-relay-meter"\n'
                   for u in range(1, per_gateway + 1))  # fmt: skip
    return "".join(out)


def cursors_present(path: Path, meters: list[str]) -> None:
    """The boundary-read cursors a site that has run for a while keeps (two per meter)."""
    outbox = Outbox(path)
    at = time.time_ns() // 900_000_000_000 * 900_000_000_000 - 900_000_000_000
    for first in range(0, len(meters), 10_000):
        chunk = meters[first : first + 10_000]
        outbox.accept_sync([], cursors={k: v for m in chunk for k, v in
                                        ((f"boundary:{m}:t", at), (f"boundary:{m}:v", 1_000_000_000))})  # fmt: skip
    outbox.close()


async def run(work: Path, gateways: int, real: int, per_gateway: int, keep_log: Path | None) -> None:
    sims = [await launch.modbus_meters(per_gateway) for _ in range(real)]
    ports = [port for port, _ in sims] + [free_port() for _ in range(gateways - real)]
    meters = [f"M{g}-{u}" for g in range(gateways) for u in range(1, per_gateway + 1)]
    api = free_port()
    (work / "site.toml").write_text(site(work, api, ports, per_gateway))
    await asyncio.to_thread(cursors_present, work / "outbox.sqlite", meters)
    began = time.perf_counter()
    serve = await start_serve(work / "site.toml", log=work / "serve.log")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api}", timeout=60) as client:
            await until_healthy(client, serve, work / "serve.log")
            ready = time.perf_counter() - began
            scrapes: list[float] = []
            while True:
                asked = time.perf_counter()
                text = (await client.get("/metrics")).text
                scrapes.append(time.perf_counter() - asked)
                if metric(text, "headend_plan_last_run_finished_timestamp_seconds", plan="boundary"):
                    break
                await asyncio.sleep(POLL)
    finally:
        serve.terminate()
        await serve.wait()
        if keep_log is not None:
            await asyncio.to_thread(shutil.copyfile, work / "serve.log", keep_log)
        for _port, proc in sims:
            proc.terminate()
            await proc.wait()
    ok = metric(text, "headend_meter_reads_total", plan="boundary", result="ok")
    failed = sum(metric(text, "headend_meter_reads_total", plan="boundary", result=r) for r in ("failed", "skipped"))
    count, p50, p99, worst = loop_lag(text)
    print(f"{platform.python_implementation()} {platform.python_version()}; {os.cpu_count()} cores; "
          f"{len(meters):,} meters on {gateways} Modbus TCP gateways ({real} real, {per_gateway * real:,} meters "
          f"read; the rest down); {2 * len(meters):,} cursor rows")  # fmt: skip
    print(f"serve ready in {ready:.1f} s; the plan run: {int(ok):,} read, {int(failed):,} failed")
    print(f"event loop lag over {count:,} ticks of 50 ms (start, the run, /metrics every {POLL:g} s): "
          f"p50 <= {p50 * 1000:g} ms, p99 <= {p99 * 1000:g} ms, max {worst * 1000:.0f} ms")  # fmt: skip
    print("  limit (issue #22's target): p99 < 20 ms, max < 100 ms")
    print(f"/metrics answered in {statistics.median(scrapes) * 1000:.0f} ms (median of {len(scrapes)}), "
          f"max {max(scrapes) * 1000:.0f} ms (rendered in a thread; what it costs the loop shows in the lag above)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gateways", type=int, default=500)
    p.add_argument("--real", type=int, default=10)
    p.add_argument("--per-gateway", type=int, default=200)
    p.add_argument("--log", type=Path, help="keep serve's log here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(Path(tmp), args.gateways, args.real, args.per_gateway, args.log))


if __name__ == "__main__":
    main()
