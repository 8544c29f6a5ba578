"""`headend commission TARGET`: resolve the target, run the protocol's checks with a live
table, save the report, optionally register what was found.

TARGET is a link or concentrator id from `--config`, or given directly:
`tcp:HOST:PORT` (with `--protocol dlms-wrapper|dlms-hdlc|modbus-tcp`),
`serial:/dev/ttyUSB0` (with `--protocol dlms-hdlc|modbus-rtu`, `--baud`, `--parity`),
`mqtt:HOST:PORT/CONCENTRATOR`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import tomlkit
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from headend.commission.checks import Options
from headend.commission.report import FoundMeter, Report
from headend.config import Config, DlmsSettings, MqttLink, SerialLink, TcpLink
from headend.registry import Registry

_STYLE = {"pass": "green", "warn": "yellow", "fail": "red", "info": "cyan"}


class TargetError(ValueError):
    pass


@dataclass
class Target:
    text: str
    link: TcpLink | SerialLink | MqttLink
    concentrator: str | None = None

    @property
    def protocol(self) -> str:
        return self.link.protocol


def resolve(text: str, cfg: Config | None, *, protocol: str | None = None, baud: int = 9600, parity: str = "N",
            timeout: float = 5.0) -> Target:  # fmt: skip
    """A target from the config (link or concentrator id) or from its address."""
    if cfg is not None:
        for link in cfg.links:
            if link.id == text:
                return Target(text, link)
        for c in cfg.concentrators:
            if c.id == text:
                link = next(x for x in cfg.links if x.id == c.link)
                if not isinstance(link, MqttLink):
                    raise TargetError(f"concentrator {text}'s link {link.id} is not an MQTT link")
                return Target(text, link, concentrator=c.id)
    kind, _, rest = text.partition(":")
    t = timedelta(seconds=timeout)
    try:
        if kind == "tcp":
            host, _, port = rest.rpartition(":")
            if protocol not in ("dlms-wrapper", "dlms-hdlc", "modbus-tcp"):
                raise TargetError("a tcp: target needs --protocol dlms-wrapper, dlms-hdlc or modbus-tcp")
            return Target(text, TcpLink(kind="tcp", id="target", protocol=protocol, host=host, port=int(port),
                                        timeout=t))  # type: ignore[arg-type]  # fmt: skip
        if kind == "serial":
            if protocol not in ("dlms-hdlc", "modbus-rtu"):
                raise TargetError("a serial: target needs --protocol dlms-hdlc or modbus-rtu")
            return Target(text, SerialLink(kind="serial", id="target", protocol=protocol, device=rest,
                                           baudrate=baud, parity=parity, timeout=t))  # type: ignore[arg-type]  # fmt: skip
        if kind == "mqtt":
            address, _, concentrator = rest.partition("/")
            host, _, port = address.rpartition(":")
            if not concentrator:
                raise TargetError("an mqtt: target is mqtt:HOST:PORT/CONCENTRATOR")
            return Target(text, MqttLink(kind="mqtt", id="target", host=host, port=int(port), timeout=t),
                          concentrator=concentrator)  # fmt: skip
    except (ValueError, TypeError) as exc:
        if isinstance(exc, TargetError):
            raise
        raise TargetError(f"{text!r}: {exc}") from None
    known = f" or one of the config's links/concentrators ({', '.join(_ids(cfg))})" if cfg else ""
    raise TargetError(f"{text!r} is not tcp:HOST:PORT, serial:DEVICE or mqtt:HOST:PORT/CONCENTRATOR{known}")


def _ids(cfg: Config) -> list[str]:
    return [x.id for x in cfg.links] + [c.id for c in cfg.concentrators]


class LiveView:
    """The terminal while it runs: a progress bar for scans and the checks as they come."""

    def __init__(self, console: Console, report: Report) -> None:
        self.console = console
        self.report = report
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TimeElapsedColumn(), console=console)  # fmt: skip
        self.task = self.bar.add_task("scanning", total=1, visible=False)
        self.live = Live(self.render(), console=console, refresh_per_second=8, transient=False)

    def progress(self, done: int, total: int, what: str) -> None:
        self.bar.update(self.task, completed=done, total=max(total, 1), description=what, visible=done < total)
        self.live.update(self.render())

    def render(self) -> Table:
        table = Table(title=f"Commissioning {self.report.target} ({self.report.protocol})", expand=False)
        for column in ("meter", "check", "result", "measured", "hint"):
            table.add_column(column, overflow="fold")
        for c in self.report.checks:
            table.add_row(c.meter or "link", c.name, f"[{_STYLE[c.status]}]{c.status}[/]", c.measured, c.hint)
        outer = Table.grid()
        outer.add_row(table)
        outer.add_row(self.bar)
        return outer

    def refresh(self) -> None:
        self.live.update(self.render())


async def commission(target: Target, cfg: Config | None, opts: Options, *, auth: DlmsSettings,
                     console: Console | None = None) -> Report:  # fmt: skip
    """Run every check for the target; never raises for what a meter or link does."""
    registry = Registry(cfg) if cfg is not None else None
    report = Report(target.text, target.protocol, opts.engineer, opts.site)
    console = console or Console()
    view = LiveView(console, report)
    report.on_check = lambda _check: view.refresh()  # the table grows as checks come in
    with view.live:
        if isinstance(target.link, MqttLink):
            from headend.commission.mqtt import commission_mqtt

            assert target.concentrator is not None
            await commission_mqtt(target.link, target.concentrator, registry, opts, report, view.progress)
        elif target.link.protocol.startswith("dlms"):
            from headend.commission.dlms import commission_dlms

            await commission_dlms(target.link, registry, opts, report, view.progress, auth=auth)
        else:
            from headend.commission.modbus import commission_modbus

            await commission_modbus(target.link, registry, opts, report, view.progress)
        report.finished = datetime.now(UTC)
        view.refresh()
    report.on_check = None
    return report


# -- --register -------------------------------------------------------------------------


class RegisterConflict(ValueError):
    pass


def register(report: Report, target: Target, path: Path, *, force: bool = False) -> list[str]:
    """Add the meters found to a registry file ([[meters]] entries). An entry with the same
    id, or the same address on the same link, or the same serial, that says something else is
    a conflict: refused unless `force`, which updates that entry with what was found (its id,
    customer, protection, groups and every other field it has stay: the metering point is
    the same, the meter in it changed). The file is edited with tomlkit: comments, order and
    every field are kept, and values are escaped as TOML requires."""
    doc = tomlkit.parse(path.read_text(encoding="utf-8")) if path.exists() else tomlkit.document()
    if "meters" not in doc:
        doc.append("meters", tomlkit.aot())
    meters = doc["meters"]
    added: list[str] = []
    conflicts: list[str] = []
    failed = {c.meter for c in report.checks if c.name == "identity" and c.status == "fail"}
    for found in report.meters:
        if found.registry_id is not None and found.registry_id in failed:
            conflicts.append(f"{found.address}: identity check failed; sort the meter out before registering it")
            continue
        entry = _entry(found, target)
        clash = [m for m in meters if m.get("id") == entry["id"]
                 or (m.get("serial") and m.get("serial") == entry.get("serial"))
                 or (m.get("link", m.get("concentrator")) == entry.get("link", entry.get("concentrator"))
                     and m.get("address") == entry.get("address") and "address" in entry)]  # fmt: skip
        if any(_says(m, {k: v for k, v in entry.items() if k != "id"}) for m in clash):
            continue  # already registered so (under its id or an earlier one)
        if clash and not force:
            ids = ", ".join(str(m.get("id")) for m in clash)
            conflicts.append(f"{found.address} (serial {found.serial}) conflicts with {ids}; --force updates it")
            continue
        if len(clash) > 1:
            ids = " and ".join(str(m.get("id")) for m in clash)
            conflicts.append(f"{found.address} (serial {found.serial}) matches {ids}: edit the registry by hand")
            continue
        if clash:
            (kept,) = clash
            _update(kept, {k: v for k, v in entry.items() if k != "id"})
            added.append(str(kept["id"]))
        else:
            meters.append(_table(entry))
            added.append(entry["id"])
    if conflicts:
        raise RegisterConflict("; ".join(conflicts))
    # Written aside and renamed over: a crash or a full disk never leaves half a registry.
    partial = path.with_name(path.name + ".partial")
    partial.write_text(tomlkit.dumps(doc), encoding="utf-8")
    os.replace(partial, path)
    return added


def _says(existing: Any, entry: dict[str, Any]) -> bool:
    """The existing entry already says everything found (nested tables included)."""
    for key, value in entry.items():
        if isinstance(value, dict):
            if not isinstance(existing.get(key), dict) or not _says(existing[key], value):
                return False
        elif existing.get(key) != value:
            return False
    return True


def _update(existing: Any, found: dict[str, Any]) -> None:
    for key, value in found.items():
        if isinstance(value, dict) and isinstance(existing.get(key), dict):
            _update(existing[key], value)  # dlms = {physical}: the authentication and keys stay
        else:
            existing[key] = value


def _table(entry: dict[str, Any]) -> Any:
    table = tomlkit.table()
    for key, value in entry.items():
        if isinstance(value, dict):
            inline = tomlkit.inline_table()
            inline.update(value)
            table[key] = inline
        else:
            table[key] = value
    return table


def _entry(found: FoundMeter, target: Target) -> dict[str, Any]:
    meter_id = found.registry_id or (f"SN{found.serial}" if found.serial else found.address.replace(":", "-"))
    entry: dict[str, Any] = {"id": meter_id}
    if target.concentrator:
        entry["concentrator"] = target.concentrator
    else:
        entry["link"] = target.link.id
    kind, _, where = found.address.partition(":")
    if kind == "unit":
        entry["address"] = int(where)
    elif kind == "hdlc":
        entry["dlms"] = {"physical": int(where)}
    if found.serial:
        entry["serial"] = found.serial
    if found.map:
        entry["map"] = found.map
    if found.model:
        entry["model"] = found.model
    return entry
