"""The `headend` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from headend import __version__
from headend.api.auth import TokenStore
from headend.config import ConfigError, StorageConfig, load_config
from headend.storage.outbox import WriterLocked
from headend.storage.pipeline import MissingSecret, Pipeline

EXIT_CONFIG = 2

console = Console(soft_wrap=True)


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

    demo = sub.add_parser("demo", help="simulated meters of every protocol read by the head-end, live")
    demo.add_argument("--dir", default="var/demo", help="where the demo keeps its data")
    demo.add_argument("--duration", type=float, default=30.0, help="seconds to run")

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
            from headend.demo import run_demo  # the demo pulls in the simulators

            return asyncio.run(run_demo(Path(args.dir), args.duration, console))
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
