"""The `headend` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import httpx
from rich.console import Console
from rich.table import Table

from headend import __version__
from headend.api.auth import TokenStore
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


TERMINAL = {"confirmed", "confirmed_ready_for_reconnection", "failed", "expired", "rejected"}


def run_switch(args: argparse.Namespace, transport: httpx.BaseTransport | None = None) -> int:
    """`headend switch ...`: exit 0 when confirmed, 1 when failed or rejected, 2 on bad use."""
    token = os.environ.get(args.token_env)
    if not token:
        print(f"headend: set {args.token_env} to your API token", file=sys.stderr)
        return EXIT_CONFIG
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=args.api, headers=headers, timeout=10, transport=transport) as client:
        if args.what == "status":
            r = client.get("/commands", params={"meter": args.meter})
            if r.status_code != 200:
                print(f"headend: {r.status_code} {r.text}", file=sys.stderr)
                return 1
            table = Table(title=f"Relay commands of {args.meter}")
            for col in ("id", "action", "state", "who", "why"):
                table.add_column(col)
            for c in r.json()["commands"]:
                table.add_row(c["id"][:8], c["action"], c["state"], c["who"], c["why"])
            console.print(table)
            return 0
        if not args.reason:
            print("headend: --reason is required (it goes into the audit trail)", file=sys.stderr)
            return EXIT_CONFIG
        body = {"action": args.what, "reason": args.reason, "idempotency_key": args.key}
        r = client.post(f"/meters/{args.meter}/commands", json={k: v for k, v in body.items() if v is not None})
        if r.status_code != 202:
            print(f"headend: {r.status_code} {r.text}", file=sys.stderr)
            return 1
        command = r.json()
        deadline = time.monotonic() + args.wait
        while command["state"] not in TERMINAL and time.monotonic() < deadline:
            time.sleep(0.2)  # polling the API for the outcome the operator is waiting for
            command = client.get(command["href"]).json()
        console.print(f"{args.what} {args.meter}: [bold]{command['state']}[/] (command {command['id']})")
        for key, value in command.get("evidence", {}).items():
            console.print(f"  {key}: {value}")
        return 0 if command["state"].startswith("confirmed") else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headend", description="AMI head-end and meter-communication server")
    parser.add_argument("--version", action="version", version=f"headend {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the storage pipeline on embedded defaults with sample reads")
    demo.add_argument("--config", help="TOML config (default: embedded SQLite defaults under var/demo)")
    demo.add_argument("--meters", type=int, default=5)
    demo.add_argument("--days", type=int, default=1)

    serve = sub.add_parser("serve", help="run plans, links, the storage writer and the HTTP API")
    serve.add_argument("--config", required=True)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("config")

    drain = sub.add_parser("drain", help="write everything left in the outbox to the store, then exit")
    drain.add_argument("--config", required=True)

    switch = sub.add_parser("switch", help="disconnect, reconnect or show a meter's relay commands (via the API)")
    switch.add_argument("what", choices=["disconnect", "reconnect", "status"])
    switch.add_argument("meter")
    switch.add_argument("--reason", help="why (required for disconnect and reconnect)")
    switch.add_argument("--key", help="idempotency key (a retry with the same key returns the same command)")
    switch.add_argument("--api", default=os.environ.get("HEADEND_API", "http://127.0.0.1:8080"))
    switch.add_argument("--token-env", default="HEADEND_TOKEN", help="environment variable holding the bearer token")
    switch.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the outcome (0: do not wait)")

    token = sub.add_parser("token", help="issue an API token; its hash is appended to the tokens file")
    token.add_argument("name")
    token.add_argument("--roles", required=True, help="comma-separated: operator,override,billing,engineer,read-only")
    token.add_argument("--file", required=True)
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
        level=logging.DEBUG if args.verbose else logging.INFO if args.command == "serve" else logging.WARNING,
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
        if args.command == "serve":
            from headend.server import serve  # the server pulls in FastAPI and uvicorn

            return asyncio.run(serve(load_config(args.config)))
        if args.command == "drain":
            return asyncio.run(run_drain(load_config(args.config).storage))
        if args.command == "switch":
            return run_switch(args)
        if args.command == "token":
            issued = TokenStore.issue(args.file, args.name, frozenset(r.strip() for r in args.roles.split(",")))
            console.print(f"token for {args.name} (shown once; only its hash is stored in {args.file}):")
            print(issued)
            return 0
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    except (MissingSecret, WriterLocked) as exc:
        print(f"headend: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return 1


if __name__ == "__main__":
    sys.exit(main())
