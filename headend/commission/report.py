"""The commissioning report: every check with its measured value, for the job record.

Saved as JSON (machines) and as one self-contained HTML page (people: no scripts, no
external files, prints on one sheet per site).
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

Status = Literal["pass", "warn", "fail", "info"]
SEVERITY = {"info": 0, "pass": 0, "warn": 1, "fail": 2}


@dataclass
class Check:
    name: str  # connect, handshake, discovery, identity, clock, relay, ct_pt, energy, profile, relay_test
    status: Status
    measured: str
    meter: str | None = None  # None: a check of the link itself
    expected: str = ""
    hint: str = ""


@dataclass
class FoundMeter:
    """A meter that answered: where, what it says it is, and which registry entry it matched."""

    address: str  # hdlc:17, wrapper:1, unit:3, dc-1/M1
    protocol: str
    serial: str | None = None
    model: str | None = None
    firmware: str | None = None
    registry_id: str | None = None
    map: str | None = None  # Modbus register map that answered


@dataclass
class Report:
    target: str
    protocol: str
    engineer: str
    site: str
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    finished: datetime | None = None
    checks: list[Check] = field(default_factory=list)
    meters: list[FoundMeter] = field(default_factory=list)
    #: Called with each check as it is added (the live terminal table).
    on_check: Callable[[Check], None] | None = field(default=None, repr=False, compare=False)

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        if self.on_check is not None:
            self.on_check(check)
        return check

    @property
    def verdict(self) -> Status:
        worst = max((SEVERITY[c.status] for c in self.checks), default=0)
        return {0: "pass", 1: "warn", 2: "fail"}[worst]  # type: ignore[return-value]

    def for_meter(self, meter: str | None) -> list[Check]:
        return [c for c in self.checks if c.meter == meter]

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target, "protocol": self.protocol, "engineer": self.engineer, "site": self.site,
            "started": self.started.isoformat(), "finished": self.finished.isoformat() if self.finished else None,
            "verdict": self.verdict, "checks": [asdict(c) for c in self.checks],
            "meters": [asdict(m) for m in self.meters],
        }  # fmt: skip

    def save(self, directory: Path) -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        stamp = self.started.strftime("%Y%m%dT%H%M%SZ")
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in self.site or "site")[:60]
        base = directory / f"commission-{safe}-{stamp}"
        json_path, html_path = base.with_suffix(".json"), base.with_suffix(".html")
        json_path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        html_path.write_text(render_html(self), encoding="utf-8")
        return json_path, html_path


_COLOURS = {"pass": "#1b7f3b", "warn": "#b26a00", "fail": "#b3261e", "info": "#44546a"}
_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #1d1d1f; }
h1 { font-size: 1.4em; margin: 0 0 .2em; } h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
table { border-collapse: collapse; width: 100%; margin-bottom: 1em; }
th, td { text-align: left; padding: .35em .6em; border-bottom: 1px solid #ddd; vertical-align: top; }
th { background: #f3f4f6; } .meta td { border: none; padding: .1em .6em .1em 0; }
.badge { display: inline-block; padding: .1em .6em; border-radius: .8em; color: #fff; font-weight: 600; }
.verdict { font-size: 1.3em; } .hint { color: #555; font-size: .9em; }
"""


def _badge(status: str) -> str:
    return f'<span class="badge" style="background:{_COLOURS[status]}">{html.escape(status.upper())}</span>'


def render_html(report: Report) -> str:
    e = html.escape
    rows_meta = [("Site", report.site), ("Engineer", report.engineer),
                 ("Target", f"{report.target} ({report.protocol})"),
                 ("Started", report.started.isoformat(timespec="seconds")),
                 ("Finished", report.finished.isoformat(timespec="seconds") if report.finished else "-")]  # fmt: skip
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Commissioning {e(report.site)} {e(report.target)}</title><style>{_CSS}</style></head><body>",
        f"<h1>Commissioning report: {e(report.site)}</h1>",
        f'<p class="verdict">Verdict {_badge(report.verdict)}</p>',
        '<table class="meta">' + "".join(f"<tr><td><b>{e(k)}</b></td><td>{e(v)}</td></tr>" for k, v in rows_meta)
        + "</table>",
        "<h2>Meters found</h2><table><tr><th>Address</th><th>Registry</th><th>Serial</th><th>Model</th>"
        "<th>Firmware</th></tr>",
    ]  # fmt: skip
    for m in report.meters:
        parts.append(f"<tr><td>{e(m.address)}</td><td>{e(m.registry_id or '-')}</td><td>{e(m.serial or '-')}</td>"
                     f"<td>{e(m.model or m.map or '-')}</td><td>{e(m.firmware or '-')}</td></tr>")  # fmt: skip
    parts.append("</table>")
    groups: dict[str | None, list[Check]] = {}
    for c in report.checks:
        groups.setdefault(c.meter, []).append(c)
    for meter, checks in groups.items():
        parts.append(f"<h2>{e(meter) if meter else 'Link'}</h2>")
        parts.append("<table><tr><th>Check</th><th>Result</th><th>Measured</th><th>Expected</th><th>Hint</th></tr>")
        for c in checks:
            parts.append(f"<tr><td>{e(c.name)}</td><td>{_badge(c.status)}</td><td>{e(c.measured)}</td>"
                         f'<td>{e(c.expected)}</td><td class="hint">{e(c.hint)}</td></tr>')  # fmt: skip
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
