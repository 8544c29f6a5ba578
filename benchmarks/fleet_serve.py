"""Meters per second read by `headend serve` as deployed: a plan (clock, a day of load profile
96 x 4, the import register) over `--meters` simulated DLMS meters (TCP wrapper, LLS, one
port each, the simulator in its own process), each read committed to the outbox and written
to the store (SQLite) by serve's writer.

The plan runs every minute; the benchmark waits for its first run to finish and reports the
run's meters/s (from serve's own metrics: reads by result). A run starts every meter at once,
one session per link (here one meter per link). The limit it is compared with, measured in the
same run: the DLMS sessions alone (association, clock, profile, register, release) against the
same simulator, `--sessions` at a time, no engine, no outbox.

    python benchmarks/fleet_serve.py [--meters 200] [--sessions 50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import tempfile
import time
from pathlib import Path

import httpx
from limits import PASSWORD, dlms_sessions_alone
from serving import metric, start_serve, until_healthy

from headend.localservers import free_port
from headend.model import IMPORT_ENERGY
from simulators import launch

POLL = 2.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process and its running children (serve's writer
    process), from Linux's /proc."""
    total = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # ended meanwhile
            if int(entry) == pid or int(fields[1]) == pid:
                total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def site(work: Path, api: int, ports: list[int]) -> str:
    links = "".join(f'[[links]]\nid = "l{i}"\nkind = "tcp"\nprotocol = "dlms-wrapper"\nhost = "127.0.0.1"\n'
                    f'port = {port}\ntimeout = "10s"\n' for i, port in enumerate(ports))  # fmt: skip
    meters = "".join(f'[[meters]]\nid = "D{i}"\nlink = "l{i}"\n'
                     f'dlms = {{ authentication = "lls", password_env = "FLEET_PASSWORD" }}\n'
                     for i in range(len(ports)))  # fmt: skip
    return f"""state_dir = "{work / "state"}"
[storage]
backend = "sqlite"
outbox = "{work / "outbox.sqlite"}"
[storage.sqlite]
path = "{work / "readings.sqlite"}"
[api]
port = {api}
[[plans]]
id = "day"
read = ["clock", "profile", "registers"]
channels = ["{IMPORT_ENERGY}"]
every = "1m"
window = "1m"
history = "1d"
{links}{meters}"""


async def run(work: Path, meters: int, sessions: int) -> None:
    sim, ports = await launch.dlms_meters(meters)
    api = free_port()
    (work / "site.toml").write_text(site(work, api, ports))
    os.environ["FLEET_PASSWORD"] = PASSWORD.decode()
    serve = await start_serve(work / "site.toml", log=work / "serve.log")
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api}", timeout=30) as client:
            await until_healthy(client, serve, work / "serve.log")
            # The run's start and end as serve records them; /metrics asked every 2 s only:
            # rendering it costs serve's loop (a series per link; here a link per meter), and
            # asked every 50 ms it took half of the run's time.
            finished = 0.0
            cpu_seen: list[tuple[float, float]] = []  # (wall time, serve's CPU seconds so far)
            while not finished:
                await asyncio.sleep(POLL)
                cpu_seen.append((time.time(), cpu_seconds(serve.pid)))
                text = (await client.get("/metrics")).text
                finished = metric(text, "headend_plan_last_run_finished_timestamp_seconds", plan="day")
            started = metric(text, "headend_plan_last_run_started_timestamp_seconds", plan="day")
            cpu_before = max((c for t, c in cpu_seen if t < started), default=0.0)
            cpu_used = cpu_seconds(serve.pid) - cpu_before
            done = metric(text, "headend_meter_reads_total", plan="day", result="ok")
            failed = metric(text, "headend_meter_reads_total", plan="day", result="failed")
    finally:
        serve.terminate()
        await serve.wait()
    limit = await dlms_sessions_alone({f"D{i}": port for i, port in enumerate(ports)}, sessions)
    sim.terminate()
    await sim.wait()
    elapsed = finished - started
    rate = meters / elapsed
    print(f"{platform.python_implementation()} {platform.python_version()}; {os.cpu_count()} cores; {meters} DLMS "
          "meters (simulator in its own process)")  # fmt: skip
    print(f"headend serve, one plan run: {int(done)} read, {int(failed)} failed in {elapsed:.1f} s: "
          f"{rate:.1f} meters/s (clock + 96 x 4 profile + register, outbox, SQLite store; from the run's "
          "start to its end as serve records them)")  # fmt: skip
    print(f"  serve's CPU (its writer process included): {cpu_used / meters * 1000:.1f} ms per meter "
          f"({cpu_used:.1f} s over the run and up to {POLL:.0f} s before it)")  # fmt: skip
    print(f"  limit (same run): the DLMS sessions alone, {sessions} at a time: {limit:.1f} meters/s; "
          f"ratio {rate / limit:.2f}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--meters", type=int, default=200)
    p.add_argument("--sessions", type=int, default=50)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(Path(tmp), args.meters, args.sessions))


if __name__ == "__main__":
    main()
