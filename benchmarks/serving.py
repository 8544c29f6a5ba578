"""`headend serve` as the benchmarks run it: its own process, a site file, ready once /health
answers (and a clear stop, with its log, if it dies while starting)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


async def start_serve(config: Path, *, log: Path, python_args: tuple[str, ...] = ()) -> asyncio.subprocess.Process:
    """`headend serve --config config`, its stderr in `log`."""
    with log.open("wb") as stderr:  # the child keeps its own copy of the descriptor
        return await asyncio.create_subprocess_exec(
            sys.executable, *python_args, "-m", "headend.cli", "serve", "--config", str(config), cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=stderr,
        )  # fmt: skip


def metric(text: str, name: str, **labels: str) -> float:
    """The first sample of `name` in a /metrics answer whose labels include `labels` (0.0: none)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(name) and (not want or want in line):
            return float(line.split()[-1])
    return 0.0


def loop_lag(text: str) -> tuple[int, float, float, float]:
    """(ticks, p50 bound, p99 bound, max) of serve's event-loop lag, in seconds, from a /metrics
    answer (the bounds are the histogram's own buckets, read from it)."""
    count = metric(text, "headend_event_loop_lag_seconds_count")
    prefix = 'headend_event_loop_lag_seconds_bucket{le="'
    under = sorted((float(line[len(prefix):].split('"', 1)[0]), float(line.split()[-1]))
                   for line in text.splitlines() if line.startswith(prefix))  # fmt: skip
    p50 = next((b for b, n in under if n >= 0.5 * count), float("inf"))
    p99 = next((b for b, n in under if n >= 0.99 * count), float("inf"))
    return int(count), p50, p99, metric(text, "headend_event_loop_lag_max_seconds")


async def until_healthy(client: httpx.AsyncClient, serve: asyncio.subprocess.Process, log: Path) -> None:
    while True:
        if serve.returncode is not None:
            said = await asyncio.to_thread(log.read_text)
            raise SystemExit(f"headend serve stopped while starting: {said[-2000:]}")
        try:
            if (await client.get("/health")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.05)  # the server is starting
