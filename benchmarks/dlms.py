"""DLMS/COSEM over the TCP wrapper: associations per second and profile-days per second.

Starts the DLMS meter simulator in its own process (`python -m simulators.dlms_meter`)
and, through `DlmsSession`: (1) opens LLS associations and reads the clock, releasing each;
(2) reads one day of the 15-minute load profile (4 energy channels, by range descriptor,
GET data blocks) per association.

    python benchmarks/dlms.py [--meters 4] [--seconds 10] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time
from datetime import timedelta
from pathlib import Path

from headend.protocols.dlms.client import DlmsSession
from simulators import launch
from simulators.dlms_meter import PROFILE

ROOT = Path(__file__).resolve().parent.parent


async def measure(ports: list[int], seconds: float, concurrency: int, profile: bool) -> float:
    deadline = time.perf_counter() + seconds
    done = 0

    async def worker(i: int) -> None:
        nonlocal done
        port = ports[i % len(ports)]
        while time.perf_counter() < deadline:
            async with DlmsSession.tcp_wrapper(
                "127.0.0.1", port, f"B{i}", authentication="lls", password=b"12345678"
            ) as s:
                now = await s.read_clock()
                if profile:
                    rows = await s.read_profile(PROFILE, now - timedelta(days=2), now - timedelta(days=1))
                    assert len(rows) == 96 * 4
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return done / (time.perf_counter() - t0)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--meters", type=int, default=4)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--concurrency", type=int, default=4)
    args = p.parse_args()
    sim, ports = await launch.dlms_meters(args.meters)
    try:
        print(f"{platform.python_implementation()} {platform.python_version()}; {args.meters} simulated meters "
              f"in their own process, {args.concurrency} concurrent sessions, {args.seconds:g} s each")  # fmt: skip
        rate = await measure(ports, args.seconds, args.concurrency, profile=False)
        print(f"  associations (AARQ/AARE LLS + clock read + release): {rate:7.1f}/s")
        rate = await measure(ports, args.seconds, args.concurrency, profile=True)
        print(f"  profile-days (association + 96 rows x 4 channels by range): {rate:7.1f}/s")
    finally:
        sim.terminate()
        await sim.wait()


if __name__ == "__main__":
    asyncio.run(main())
