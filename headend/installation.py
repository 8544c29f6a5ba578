"""This installation's identity: random ids made once and kept in state_dir.

Two head-ends (or a commissioning laptop) sharing a broker must not share an MQTT client id:
the broker would hand one's persistent session, and its queued messages, to the other. An
installation that already ran before this id existed keeps the id it used ("headend"), so
its persistent session and the messages queued in it are not abandoned by an upgrade.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

_FILE = "installation_id"
LEGACY_ID = "headend"


def installation_id(state_dir: Path) -> str:
    path = state_dir / _FILE
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        pass
    state_dir.mkdir(parents=True, exist_ok=True)
    earlier = any(state_dir.glob("*.sqlite"))
    new = LEGACY_ID if earlier else f"he-{secrets.token_hex(6)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(new + "\n")
    return new


_TITLE_FILE = "dlms_system_title"


def dlms_system_title(state_dir: Path, configured: str | None = None) -> bytes:
    """The configured system title, or this installation's own: "HED" and 5 random bytes,
    made once and kept in state_dir."""
    if configured is not None:
        return bytes.fromhex(configured)
    path = state_dir / _TITLE_FILE
    try:
        return bytes.fromhex(path.read_text(encoding="utf-8").strip())
    except FileNotFoundError:
        pass
    state_dir.mkdir(parents=True, exist_ok=True)
    title = b"HED" + secrets.token_bytes(5)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(title.hex() + "\n")
    return title
