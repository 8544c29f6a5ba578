"""Meters per second read over Modbus TCP.

Starts the Modbus simulator in its own process (`python -m simulators.modbus_meter`) with
N unit ids behind one TCP port, as a gateway or a fleet of direct TCP meters would be, and
reads every mapped channel of every meter (the whole map: 13 channels, coalesced by the
map's block plan) through `ModbusMeterSession`, with 1 connection and with C parallel
connections.

    python benchmarks/modbus.py [--map eastron-sdm630] [--meters 100] [--rounds 5] [--connections 8]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

from headend.localservers import free_port
from headend.protocols.modbus import ModbusLink
from headend.protocols.modbus_maps import find_map, plan_blocks

ROOT = Path(__file__).resolve().parent.parent


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"simulator exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("simulator did not start")


async def poll(port: int, map_name: str, meters: int, rounds: int, connections: int) -> float:
    meter_map = find_map(map_name)
    channels = [c.obis for c in meter_map.channels]
    links = [ModbusLink.tcp("127.0.0.1", port, timeout=2.0) for _ in range(connections)]
    for link in links:
        await link.connect()

    async def worker(i: int) -> int:
        done = 0
        link = links[i]
        for _ in range(rounds):
            for unit in range(1 + i, meters + 1, connections):
                readings = await link.session(f"B-{unit}", unit, meter_map).read_registers(channels)
                assert len(readings) == len(channels)
                done += 1
        return done

    t0 = time.perf_counter()
    done = sum(await asyncio.gather(*(worker(i) for i in range(connections))))
    elapsed = time.perf_counter() - t0
    for link in links:
        link.close()
    return done / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--map", default="eastron-sdm630")
    p.add_argument("--meters", type=int, default=100)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--connections", type=int, default=8)
    args = p.parse_args()
    meter_map = find_map(args.map)
    requests = len(plan_blocks(meter_map, meter_map.channels))
    port = free_port()
    sim = subprocess.Popen(
        [sys.executable, "-m", "simulators.modbus_meter", "--map", args.map, "--units", f"1-{args.meters}",
         "--tcp", f"127.0.0.1:{port}"],
        cwd=ROOT, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_listening(port, sim)
        print(
            f"{platform.python_implementation()} {platform.python_version()}; {meter_map.manufacturer} "
            f"{meter_map.model}: {len(meter_map.channels)} channels in {requests} request(s) per meter; "
            f"{args.meters} meters x {args.rounds} rounds; simulator in its own process"
        )
        for c in (1, args.connections):
            rate = asyncio.run(poll(port, args.map, args.meters, args.rounds, c))
            print(f"  {c:>2} connection(s): {rate:8.0f} meters/s ({rate * requests:8.0f} requests/s)")
    finally:
        sim.terminate()
        sim.wait()


if __name__ == "__main__":
    main()
