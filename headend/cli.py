"""The `headend` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from rich.console import Console
from rich.table import Table

from headend import __version__
from headend.config import Config, ConfigError, StorageConfig, load_config, parse_config
from headend.model import Obis, Quality, Reading
from headend.storage.outbox import WriterLocked
from headend.storage.pipeline import MissingSecret, Pipeline

EXIT_CONFIG = 2
IMPORT_PROFILE = Obis.parse("1-0:1.8.0.255")

console = Console(soft_wrap=True)


def _load(path: str | None, default: Config | None = None) -> Config:
    if path is None:
        return default or Config()
    return load_config(path)


def demo_readings(meters: int, days: int, end: datetime) -> list[Reading]:
    """A day-shaped 15-minute import profile per meter, with one marked gap on the last meter."""
    step = timedelta(minutes=15)
    start = end - timedelta(days=days)
    readings = []
    for m in range(1, meters + 1):
        meter = f"DEMO-{m:03d}"
        t = start
        while t < end:
            t += step
            hour = t.hour + t.minute / 60
            kwh = round(0.05 * m + 0.2 * (1 + math.sin((hour - 7) / 24 * 2 * math.pi)), 3)
            if m == meters and t == start + 10 * step:
                readings.append(
                    Reading(meter=meter, channel=IMPORT_PROFILE, timestamp=t, value=None, qualities=(Quality.MISSING,))
                )
                continue
            readings.append(
                Reading.from_raw(
                    meter, IMPORT_PROFILE, t, round(kwh * 1000), scaler=-3, unit="kWh", source="demo/generator"
                )
            )
    return readings


async def run_demo(storage: StorageConfig, meters: int, days: int) -> int:
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    readings = demo_readings(meters, days, end)
    started = time.perf_counter()
    async with Pipeline(storage, flush_timeout=60) as pipeline:
        accepted = await pipeline.outbox.accept(readings)
        console.print(f"accepted [bold]{accepted}[/] interval reads into the outbox [dim]{storage.outbox}[/]")
        await pipeline.writer.wait_drained()
        elapsed = time.perf_counter() - started
        console.print(f"wrote them to {pipeline.store!r} in {elapsed:.2f}s; outbox depth now {pipeline.outbox.depth()}")
        table = Table(title=f"Last {days} day(s) of 15-minute import, read back from the store")
        for col in ("meter", "intervals", "kWh", "missing", "last interval (UTC)"):
            table.add_column(col)
        for m in range(1, meters + 1):
            meter = f"DEMO-{m:03d}"
            got = await pipeline.store.query(meter, IMPORT_PROFILE, end - timedelta(days=days), end)
            last = await pipeline.store.last_interval(meter, IMPORT_PROFILE)
            missing = sum(1 for r in got if Quality.MISSING in r.qualities)
            total = sum(r.value for r in got if r.value is not None)
            table.add_row(meter, str(len(got)), f"{total:.3f}", str(missing), last.isoformat() if last else "-")
        console.print(table)
    where = storage.sqlite.path if storage.backend == "sqlite" else storage.influx.url if storage.influx else ""
    console.print(f"data is in [bold]{where}[/] ({storage.backend}); next: `headend check-config config/example.toml`")
    return 0


async def run_drain(storage: StorageConfig) -> int:
    async with Pipeline(storage, flush_timeout=3600) as pipeline:
        depth = pipeline.outbox.depth()
        console.print(f"draining {depth} readings from {storage.outbox}")
        await pipeline.writer.wait_drained()
        console.print(f"outbox empty; {pipeline.writer.stats.written} written")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headend", description="AMI head-end and meter-communication server")
    parser.add_argument("--version", action="version", version=f"headend {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the storage pipeline on embedded defaults with sample reads")
    demo.add_argument("--config", help="TOML config (default: embedded SQLite defaults under var/demo)")
    demo.add_argument("--meters", type=int, default=5)
    demo.add_argument("--days", type=int, default=1)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("config")

    drain = sub.add_parser("drain", help="write everything left in the outbox to the store, then exit")
    drain.add_argument("--config", required=True)
    return parser


DEMO_DEFAULTS = parse_config(
    {
        "storage": {
            "backend": "sqlite",
            "outbox": "var/demo/outbox.sqlite",
            "sqlite": {"path": "var/demo/readings.sqlite"},
        }
    },
    "<embedded demo defaults>",
)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "check-config":
            cfg = load_config(args.config)
            console.print(
                f"{args.config}: OK ({len(cfg.links)} links, {len(cfg.concentrators)} concentrators, "
                f"{len(cfg.meters)} meters, {len(cfg.plans)} plans)"
            )
            return 0
        if args.command == "demo":
            cfg = _load(args.config, DEMO_DEFAULTS)
            return asyncio.run(run_demo(cfg.storage, args.meters, args.days))
        if args.command == "drain":
            return asyncio.run(run_drain(load_config(args.config).storage))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    except (MissingSecret, WriterLocked) as exc:
        print(f"headend: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 1


if __name__ == "__main__":
    sys.exit(main())
