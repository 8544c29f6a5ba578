"""Start simulators in processes of their own (benchmarks measure the head-end, not them)."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from headend.localservers import free_port

ROOT = Path(__file__).resolve().parent.parent


async def modbus_meters(units: int, *extra: str) -> tuple[int, asyncio.subprocess.Process]:
    """Relay meters with unit ids 1..`units` behind one Modbus TCP port; returns once it listens.
    `extra`: more simulator options (e.g. "--disconnected", "1-100")."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "simulators.modbus_meter", "--map", "sim-relay-meter", "--units", f"1-{units}",
        "--tcp", f"127.0.0.1:{port}", *extra, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    await proc.stdout.readline()  # printed once it listens
    return port, proc


async def dlms_meters(count: int) -> tuple[asyncio.subprocess.Process, list[int]]:
    """`count` DLMS meters on TCP-wrapper ports the OS picks; returns once all listen."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "simulators.dlms_meter", "--meters", str(count), "--port", "0",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    ports = []
    for _ in range(count):
        line = (await proc.stdout.readline()).decode()  # "DLMS meter SN on HOST:PORT (TCP wrapper)"
        match = re.search(r":(\d+) \(TCP wrapper\)", line)
        if match is None:
            raise RuntimeError(f"the DLMS simulator exited with {await proc.wait()}: {line!r}")
        ports.append(int(match.group(1)))
    return proc, ports
