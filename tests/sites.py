"""Site configs for tests that run `headend serve` as a process: the common head (state,
embedded storage, API) written once, the links, meters and plans added by each test."""

from __future__ import annotations

from pathlib import Path

SWITCH_ANY_TIME = """
[switching]
disconnect_windows = [{ days = "mon-sun", start = "00:00", end = "23:59" }]
confirm_timeout = "2s"
poll_interval = "100ms"
"""


def write_site(directory: Path, api_port: int, body: str, *, tokens: bool = True, api: str = "") -> Path:
    """`directory/site.toml`: SQLite storage and state in `directory`, the API on `api_port`
    (`api`: more keys for the [api] table)."""
    tokens_line = f'tokens_file = "{directory / "tokens.toml"}"' if tokens else ""
    path = directory / "site.toml"
    path.write_text(f"""state_dir = "{directory / "state"}"
[storage]
backend = "sqlite"
outbox = "{directory / "outbox.sqlite"}"
[storage.sqlite]
path = "{directory / "readings.sqlite"}"
[api]
port = {api_port}
{tokens_line}
{api}
{body}""")
    return path


def tcp_link(link_id: str, protocol: str, port: int, timeout: str, **extra: str) -> str:
    """A `[[links]]` entry for a simulator listening on loopback (`extra`: more string keys)."""
    more = "".join(f'{key} = "{value}"\n' for key, value in extra.items())
    return f"""
[[links]]
id = "{link_id}"
kind = "tcp"
protocol = "{protocol}"
host = "127.0.0.1"
port = {port}
timeout = "{timeout}"
{more}"""


def hdlc_bus_link(link_id: str, device: str) -> str:
    """A `[[links]]` entry for an HDLC bus on a serial line (a pty in tests)."""
    return f"""
[[links]]
id = "{link_id}"
kind = "serial"
protocol = "dlms-hdlc"
device = "{device}"
timeout = "5s"
"""


def dlms_meter(meter_id: str, link: str, password_env: str, *, group: str, physical: int | None = None) -> str:
    """A `[[meters]]` entry for a simulated DLMS meter with LLS (its HDLC address, on a bus)."""
    address = f", physical = {physical}" if physical is not None else ""
    return f"""[[meters]]
id = "{meter_id}"
link = "{link}"
groups = ["{group}"]
dlms = {{ authentication = "lls", password_env = "{password_env}"{address} }}
"""
