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

from headend.storage.sqlite_db import StateFileError

_FILE = "installation_id"
LEGACY_ID = "headend"


def installation_id(state_dir: Path) -> str:
    path = state_dir / _FILE
    try:
        return path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        pass
    earlier = state_dir.is_dir() and any(state_dir.glob("*.sqlite"))
    new = LEGACY_ID if earlier else f"he-{secrets.token_hex(6)}"
    _write_once(path, new)
    return new


def _write_once(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    except OSError as exc:
        path.unlink(missing_ok=True)  # never leave an empty id behind
        raise StateFileError(f"cannot write {path}: {exc}") from exc


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
    title = b"HED" + secrets.token_bytes(5)
    _write_once(path, title.hex())
    return title
