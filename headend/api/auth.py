"""Bearer tokens with roles. Only SHA-256 hashes of tokens are stored (a TOML file).

Roles: operator (switching), override (may disconnect protected customers), billing
(arrears and payment events), engineer, read-only (reads only).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROLES = frozenset({"operator", "override", "billing", "engineer", "read-only"})


@dataclass(frozen=True)
class Principal:
    name: str
    roles: frozenset[str]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    def __init__(self, entries: dict[str, Principal]) -> None:
        self._by_hash = entries

    @classmethod
    def load(cls, path: str | Path) -> TokenStore:
        data = tomllib.loads(Path(path).read_text()) if Path(path).exists() else {}
        entries = {}
        for i, item in enumerate(data.get("tokens", [])):
            roles = frozenset(item.get("roles", []))
            unknown = roles - ROLES
            if unknown or not isinstance(item.get("sha256"), str) or len(item["sha256"]) != 64:
                raise ValueError(f"{path}: tokens[{i}]: needs sha256 (64 hex) and roles from {sorted(ROLES)}")
            entries[item["sha256"]] = Principal(str(item.get("name", f"token{i}")), roles)
        return cls(entries)

    @classmethod
    def issue(cls, path: str | Path, name: str, roles: frozenset[str]) -> str:
        """Create a token, append its hash to the file, return the token (shown once)."""
        if not roles or roles - ROLES:
            raise ValueError(f"roles must be some of {sorted(ROLES)}")
        token = secrets.token_urlsafe(32)
        roles_toml = ", ".join(f'"{r}"' for r in sorted(roles))
        entry = f'\n[[tokens]]\nname = {json.dumps(name)}\nsha256 = "{hash_token(token)}"\nroles = [{roles_toml}]\n'
        with open(path, "a", encoding="utf-8") as f:
            f.write(entry)
        return token

    def authenticate(self, token: str) -> Principal | None:
        digest = hash_token(token)
        found = None
        for stored, principal in self._by_hash.items():
            if hmac.compare_digest(stored, digest):
                found = principal
        return found
