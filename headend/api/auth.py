"""Bearer tokens with roles. Only SHA-256 hashes of tokens are stored (a TOML file, 0600).

Roles: operator (switching), override (may disconnect protected customers), billing
(arrears and payment events), engineer, read-only (reads only). The file is read again
when it changes: a token removed from it stops working without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROLES = frozenset({"operator", "override", "billing", "engineer", "read-only"})


log = logging.getLogger(__name__)


def _stamp(path: Path) -> tuple[int, ...] | None:
    # ctime and inode too: a copy that keeps mtime and size (cp -p, rsync -t) still changes them.
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_size


def _read(path: Path) -> dict[str, Principal]:
    data = tomllib.loads(path.read_text()) if path.exists() else {}
    entries = {}
    for i, item in enumerate(data.get("tokens", [])):
        roles = frozenset(item.get("roles", []))
        unknown = roles - ROLES
        if unknown or not isinstance(item.get("sha256"), str) or len(item["sha256"]) != 64:
            raise ValueError(f"{path}: tokens[{i}]: needs sha256 (64 hex) and roles from {sorted(ROLES)}")
        entries[item["sha256"]] = Principal(str(item.get("name", f"token{i}")), roles)
    return entries


@dataclass(frozen=True)
class Principal:
    name: str
    roles: frozenset[str]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    def __init__(self, entries: dict[str, Principal], path: Path | None = None) -> None:
        self._by_hash = entries
        self.path = path
        self._seen = _stamp(path) if path is not None else None

    @classmethod
    def load(cls, path: str | Path) -> TokenStore:
        return cls(_read(Path(path)), Path(path))

    def _refresh(self) -> None:
        """Read the file again if it changed since it was read. A file that does not parse
        (a typo, half written) accepts no token at all until it does: keeping the old set
        would keep a token the edit meant to revoke."""
        if self.path is None:
            return
        stamp = _stamp(self.path)
        if stamp == self._seen:
            return
        self._seen = stamp
        try:
            self._by_hash = _read(self.path)
        except (ValueError, OSError) as exc:
            self._by_hash = {}
            log.error("%s changed and cannot be read (%s): no token is accepted until it can", self.path, exc)
            return
        log.info("%s changed: %d tokens now", self.path, len(self._by_hash))

    @classmethod
    def issue(cls, path: str | Path, name: str, roles: frozenset[str]) -> str:
        """Create a token, append its hash to the file, return the token (shown once)."""
        if not roles or roles - ROLES:
            raise ValueError(f"roles must be some of {sorted(ROLES)}")
        token = secrets.token_urlsafe(32)
        roles_toml = ", ".join(f'"{r}"' for r in sorted(roles))
        entry = f'\n[[tokens]]\nname = {json.dumps(name)}\nsha256 = "{hash_token(token)}"\nroles = [{roles_toml}]\n'
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)  # also a file made before by other means: hashes are nobody else's business
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(entry)
        return token

    def authenticate(self, token: str) -> Principal | None:
        self._refresh()
        digest = hash_token(token)
        found = None
        for stored, principal in self._by_hash.items():
            if hmac.compare_digest(stored, digest):
                found = principal
        return found
