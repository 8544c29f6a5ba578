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
from typing import Any

import httpx
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from headend import __version__
from headend.api.auth import TokenStore
from headend.config import ConfigError, StorageConfig, SwitchingConfig, load_config
from headend.storage.outbox import Outbox, WriterLocked
from headend.storage.pipeline import MissingSecret, Pipeline
from headend.storage.sqlite_db import StateFileError

EXIT_CONFIG = 2

console = Console(soft_wrap=True)


async def run_drain(storage: StorageConfig) -> int:
    async with Pipeline(storage, flush_timeout=3600) as pipeline:
        depth = pipeline.outbox.depth()
        console.print(f"draining {depth} readings from {storage.outbox}")
        await pipeline.writer.wait_drained()
        console.print(f"outbox empty; {pipeline.writer.stats.written} written")
    return 0


TERMINAL = {"confirmed", "confirmed_ready_for_reconnection", "dry_run_ok", "failed", "expired", "rejected",
            "cancelled"}
#: Taken on, waiting for a window or a second person: not done, not refused.
PENDING = {"deferred", "awaiting_approval"}
EXIT_PENDING = 3


def api_client(args: argparse.Namespace, transport: httpx.BaseTransport | None = None,
               timeout: float = 10) -> httpx.Client | None:  # fmt: skip
    """A client of the head-end's API with the token from `--token-env`; None (said why) without it."""
    token = os.environ.get(args.token_env)
    if not token:
        print(f"headend: set {args.token_env} to your API token", file=sys.stderr)
        return None
    return httpx.Client(base_url=args.api, headers={"Authorization": f"Bearer {token}"}, timeout=timeout,
                        transport=transport)  # fmt: skip


def run_quarantine(args: argparse.Namespace) -> int:
    """`headend quarantine list|requeue|drop-raw`: what the store refused, sending it again,
    and clearing raw messages (that never parsed) once they have been looked at."""
    outbox = Outbox(load_config(args.config).storage.outbox)
    try:
        if args.what == "drop-raw":
            dropped = outbox.drop_raw_sync(args.id)
            console.print(f"dropped {dropped} raw message(s); quarantined readings are never dropped")
            return 0
        if args.what == "requeue":
            moved = outbox.requeue_sync(args.id)
            console.print(f"requeued {moved} reading(s); the writer of `headend serve` (or `headend drain`) "
                          "sends them again")  # fmt: skip
            return 0
        table = Table(title=f"Quarantine of {args.config}")
        for col in ("id", "when", "kind", "reason"):
            table.add_column(col, overflow="fold")
        for row in outbox.quarantine_rows():
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row.quarantined_ns / 1e9))
            kind = f"{row.readings} reading(s)" if row.requeueable else "raw message"
            table.add_row(str(row.id), when, kind, row.reason[:200])
        console.print(table)
        return 0
    finally:
        outbox.close()


def run_export(args: argparse.Namespace, transport: httpx.BaseTransport | None = None) -> int:
    """`headend export`: validated billing data of meters and a period, streamed to a file or stdout."""
    client = api_client(args, transport, timeout=600)
    if client is None:
        return EXIT_CONFIG
    params = {"start": args.start, "end": args.end, "meter": args.meter, "format": args.format}
    with client, client.stream("GET", "/billing/export", params=params) as r:
        if r.status_code != 200:
            r.read()
            print(f"headend: {r.status_code} {r.text}", file=sys.stderr)
            return 1
        out = open(args.out, "wb") if args.out else sys.stdout.buffer  # noqa: SIM115 - stdout is not ours to close
        try:
            for chunk in r.iter_bytes():
                out.write(chunk)
        finally:
            if args.out:
                out.close()
    return 0


def run_read(args: argparse.Namespace, transport: httpx.BaseTransport | None = None) -> int:
    """`headend read METER`: an on-demand read through the server, ahead of its bulk work."""
    client = api_client(args, transport, timeout=120)
    if client is None:
        return EXIT_CONFIG
    body = {"read": args.read.split(","), "hours": args.hours, "channels": args.channels.split(",") if args.channels
            else []}  # fmt: skip
    with client:
        r = client.post(f"/meters/{args.meter}/read", json=body)
    if r.status_code != 200:
        print(f"headend: {r.status_code} {r.text}", file=sys.stderr)
        return 1
    for key, value in r.json().items():
        console.print(f"{key}: {value}")
    return 0


def _when(iso: str | None) -> str:
    return "" if not iso else iso[:19].replace("T", " ")


def _show_command(command: dict[str, Any], what: str, meter: str) -> None:
    console.print(f"{what} {meter}: [bold]{command['state']}[/] (command {command['id']})")
    if command.get("code") or command.get("reason"):
        console.print(f"  {command.get('code') or 'reason'}: {command.get('reason') or command.get('detail')}")
    if command.get("not_before"):
        console.print(f"  not before: {_when(command['not_before'])}")
    for key, value in command.get("evidence", {}).items():
        console.print(f"  {key}: {value}")


def run_switch(args: argparse.Namespace, transport: httpx.BaseTransport | None = None) -> int:
    """`headend switch ...`: exit 0 when confirmed, 1 when refused or failed, 3 when taken on
    but waiting (deferred to a window, awaiting approval), 2 on bad use."""
    client = api_client(args, transport)
    if client is None:
        return EXIT_CONFIG
    with client:
        if args.what == "status":
            r = client.get("/commands", params={"meter": args.meter})
            if r.status_code != 200:
                print(f"headend: {r.status_code} {r.text}", file=sys.stderr)
                return 1
            table = Table(title=f"Relay commands of {args.meter} (newest first)")
            for col in ("id", "action", "state", "requested", "updated", "who", "why", "reason"):
                table.add_column(col, overflow="fold", no_wrap=col in ("id", "state"))
            for c in r.json()["commands"]:
                reason = " ".join(x for x in (c.get("code"), c.get("reason")) if x)
                table.add_row(c["id"][:8], c["action"], c["state"], _when(c.get("created")), _when(c.get("updated")),
                              c["who"], c["why"], reason)  # fmt: skip
            console.print(table)
            return 0
        if args.what == "approve":
            r = client.post(f"/commands/{args.meter}/approve")
        else:
            if not args.reason:
                print("headend: --reason is required (it goes into the audit trail)", file=sys.stderr)
                return EXIT_CONFIG
            body = {"action": args.what, "reason": args.reason, "idempotency_key": args.key,
                    "override": args.override, "defer": not args.no_defer}  # fmt: skip
            r = client.post(f"/meters/{args.meter}/commands", json={k: v for k, v in body.items() if v is not None})
        if r.status_code not in (200, 202):
            answer = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            reason = answer.get("detail") or r.text
            code = f" ({answer['code']})" if answer.get("code") else ""
            print(f"headend: {args.what} {args.meter} refused{code}: {r.status_code} {reason}", file=sys.stderr)
            return 1
        command = r.json()
        deadline = time.monotonic() + args.wait
        while command["state"] not in TERMINAL | PENDING and time.monotonic() < deadline:
            time.sleep(0.2)  # polling the API for the outcome the operator is waiting for
            command = client.get(command["href"]).json()
        _show_command(command, args.what, command["meter"])
        if command["state"].startswith("confirmed") or command["state"] == "dry_run_ok":
            return 0
        return EXIT_PENDING if command["state"] in PENDING else 1


def _numbers(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def run_commission(args: argparse.Namespace) -> int:
    """Exit 0 when every check passed or warned, 1 when one failed, 2 for bad arguments."""
    from headend.commission.checks import Options
    from headend.commission.run import RegisterConflict, TargetError, commission, register, resolve
    from headend.config import DlmsSettings

    cfg = load_config(args.config) if args.config else None
    try:
        target = resolve(args.target, cfg, protocol=args.protocol, baud=args.baud, parity=args.parity,
                         timeout=args.timeout)  # fmt: skip
        addresses = _numbers(args.addresses) if args.addresses else None
    except (TargetError, ValueError) as exc:
        print(f"headend commission: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    state_dir = Path(args.state_dir) if args.state_dir else cfg.state_dir if cfg else Path("var/state")
    opts = Options(engineer=args.engineer, site=args.site, sync_clock=args.sync_clock, test_relay=args.test_relay,
                   override=args.override, switching=cfg.switching if cfg else SwitchingConfig(),
                   probe_timeout=args.probe_timeout, time_box=args.time_box, addresses=addresses,
                   birth_timeout=args.birth_timeout, state_dir=state_dir)  # fmt: skip
    try:
        auth = DlmsSettings(authentication=args.auth, password_env=args.password_env,
                            encryption_key_env=args.key_env, authentication_key_env=args.auth_key_env)  # fmt: skip
    except ValidationError as exc:
        reasons = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        for key, option in (("authentication_key_env", "--auth-key-env"), ("encryption_key_env", "--key-env"),
                            ("password_env", "--password-env")):  # fmt: skip
            reasons = reasons.replace(key, option)
        print(f"headend commission: --auth {args.auth}: {reasons}", file=sys.stderr)
        return EXIT_CONFIG
    report = asyncio.run(commission(target, cfg, opts, auth=auth, console=console))
    json_path, html_path = report.save(Path(args.report_dir))
    console.print(f"verdict: [bold]{report.verdict.upper()}[/]; report: {html_path} and {json_path}")
    if args.register:
        try:
            added = register(report, target, Path(args.register), force=args.force)
        except RegisterConflict as exc:
            print(f"headend commission: not registered: {exc}", file=sys.stderr)
            return 1
        console.print(f"registered {len(added)} meter(s) in {args.register}: {', '.join(added) or 'none new'}")
    return 1 if report.verdict == "fail" else 0


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

    switch = sub.add_parser("switch", help="disconnect, reconnect, approve or show a meter's relay commands (via the "
                            "API); exit 0 confirmed, 1 refused or failed, 3 deferred or awaiting approval")  # fmt: skip
    switch.add_argument("what", choices=["disconnect", "reconnect", "status", "approve"])
    switch.add_argument("meter", help="meter id (for approve: the command id)")
    switch.add_argument("--reason", help="why (required for disconnect and reconnect)")
    switch.add_argument("--override", metavar="REASON",
                        help="disconnect a protected customer (needs the override role)")  # fmt: skip
    switch.add_argument("--no-defer", action="store_true",
                        help="outside a disconnect window, refuse instead of waiting")  # fmt: skip
    switch.add_argument("--key", help="idempotency key (a retry with the same key returns the same command)")
    switch.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the outcome (0: do not wait)")

    quarantine = sub.add_parser("quarantine", help="list quarantined readings, or requeue them after a fix")
    quarantine.add_argument("what", choices=["list", "requeue", "drop-raw"])
    quarantine.add_argument("--config", required=True)
    quarantine.add_argument("--id", type=int, action="append", help="requeue (or drop) only these rows (repeat)")

    export = sub.add_parser("export", help="validated billing data of meters and a period (via the API)")
    export.add_argument("--meter", action="append", required=True, help="a meter id; repeat for more")
    export.add_argument("--start", required=True, help="period start (exclusive), ISO 8601 with offset")
    export.add_argument("--end", required=True, help="period end (inclusive), ISO 8601 with offset")
    export.add_argument("--format", choices=["csv", "json"], default="csv")
    export.add_argument("--out", help="file to write (default: standard output)")

    read = sub.add_parser("read", help="read a meter now, ahead of bulk work (via the API)")
    read.add_argument("meter")
    read.add_argument("--read", default="clock,registers", help="comma-separated: clock,profile,registers,events")
    read.add_argument("--channels", default="1-0:1.8.0.255", help="comma-separated OBIS codes for registers")
    read.add_argument("--hours", type=float, default=24.0, help="how far back a profile or events read goes")

    for client_command in (switch, export, read):
        client_command.add_argument("--api", default=os.environ.get("HEADEND_API", "http://127.0.0.1:8080"))
        client_command.add_argument("--token-env", default="HEADEND_TOKEN",
                                    help="environment variable holding the bearer token")  # fmt: skip

    com = sub.add_parser("commission", help="discover, check and prove the meters on a link or concentrator")
    com.add_argument("target", help="link/concentrator id from --config, tcp:HOST:PORT, serial:DEVICE, "
                     "or mqtt:HOST:PORT/CONCENTRATOR")  # fmt: skip
    com.add_argument("--config", help="site config: links, the registry of meters to compare against")
    com.add_argument("--protocol", choices=["dlms-wrapper", "dlms-hdlc", "modbus-tcp", "modbus-rtu"])
    com.add_argument("--baud", type=int, default=9600)
    com.add_argument("--parity", choices=["N", "E", "O"], default="N")
    com.add_argument("--auth", choices=["none", "lls", "hls-gmac"], default="none",
                     help="DLMS authentication for meters not in the registry")  # fmt: skip
    com.add_argument("--password-env", help="environment variable with the DLMS LLS password for unknown meters")
    com.add_argument("--key-env", help="environment variable with the HLS-GMAC encryption key (hex)")
    com.add_argument("--auth-key-env", help="environment variable with the HLS-GMAC authentication key (hex)")
    com.add_argument("--state-dir", help="where DLMS invocation counters are kept (default: the config's state_dir)")
    com.add_argument("--addresses", help="HDLC addresses or Modbus unit ids to probe, e.g. 1-247 or 16,17,20-30")
    com.add_argument("--probe-timeout", type=float, default=0.3, help="seconds to wait at each probed address")
    com.add_argument("--time-box", type=float, default=120.0, help="seconds the whole scan may take")
    com.add_argument("--birth-timeout", type=float, default=10.0, help="seconds to wait for a concentrator's birth")
    com.add_argument("--timeout", type=float, default=5.0, help="seconds per request to a meter (ad hoc targets)")
    com.add_argument("--engineer", default=os.environ.get("USER", ""), help="who commissioned (for the report)")
    com.add_argument("--site", default="", help="site name (for the report)")
    com.add_argument("--report-dir", default="commissioning", help="where the JSON and HTML reports go")
    com.add_argument("--sync-clock", action="store_true", help="set meter clocks that are off")
    com.add_argument("--test-relay", action="store_true", help="open and close each relay with read-back, "
                     "then leave it as found (journaled; never a meter whose identity failed)")  # fmt: skip
    com.add_argument("--override", metavar="REASON", help="with --test-relay: switch protected customers too")
    com.add_argument("--register", metavar="FILE", help="append the meters found to this registry file")
    com.add_argument("--force", action="store_true", help="with --register: replace conflicting entries")

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
        if args.command == "quarantine":
            return run_quarantine(args)
        if args.command == "export":
            return run_export(args)
        if args.command == "read":
            return run_read(args)
        if args.command == "commission":
            return run_commission(args)
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
    except StateFileError as exc:
        print(f"headend: {exc}", file=sys.stderr)
        return 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
