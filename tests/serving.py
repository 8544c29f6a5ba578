"""`headend serve` as a process for acceptance tests: start it on a site directory, wait for
its API, talk to it as its users would (bearer tokens), kill it."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from headend.api.auth import TokenStore
from tests.conftest import Spawn

ROOT = Path(__file__).resolve().parent.parent
DONE = frozenset({"confirmed", "confirmed_ready_for_reconnection", "dry_run_ok", "failed", "expired", "cancelled",
                  "rejected"})
#: Principals of the test sites and their roles.
PRINCIPALS = {
    "anna": {"operator"},
    "chief": {"operator", "override"},
    "deputy": {"override"},
    "billing": {"billing"},
    "auditor": {"read-only"},
}


def issue_tokens(directory: Path) -> dict[str, str]:
    return {name: TokenStore.issue(directory / "tokens.toml", name, frozenset(roles))
            for name, roles in PRINCIPALS.items()}  # fmt: skip


@dataclass
class Served:
    """A running `headend serve` and an HTTP client for it."""

    directory: Path
    url: str
    tokens: dict[str, str]
    spawn: Spawn
    env: dict[str, str] = field(default_factory=dict)
    #: The module run as the server: the CLI, or tests.fault_serve to inject a fault.
    module: str = "headend.cli"
    #: Where the server's log goes (default: nowhere, or the terminal with HEADEND_TEST_SERVER_LOG=1).
    log_path: Path | None = None
    proc: asyncio.subprocess.Process | None = None
    client: httpx.AsyncClient = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.AsyncClient(base_url=self.url, timeout=30)

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    async def start(self) -> float:
        """Start the server; return the seconds until its API answered."""
        began = time.monotonic()
        # HEADEND_TEST_SERVER_LOG=1 shows the server's log while a test runs.
        log: Any = None if os.environ.get("HEADEND_TEST_SERVER_LOG") else asyncio.subprocess.DEVNULL
        if self.log_path is not None:
            log = self.log_path.open("ab")
        self.proc = await self.spawn(
            sys.executable, "-m", self.module, "serve", "--config", str(self.directory / "site.toml"), cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **self.env}, stderr=log,
        )  # fmt: skip
        if self.log_path is not None:
            log.close()  # the server has its own copy of the descriptor
        async with asyncio.timeout(60):
            while True:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"headend serve exited with {self.proc.returncode}")
                try:
                    if (await self.client.get("/health", timeout=2)).status_code == 200:
                        return time.monotonic() - began
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.02)  # polling another process's HTTP endpoint while it starts

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await asyncio.wait_for(self.proc.wait(), 30)
        await self.client.aclose()

    async def post(self, path: str, who: str, body: dict[str, Any]) -> httpx.Response:
        return await self.client.post(path, json=body, headers=self.auth(who))

    async def command(self, href: str) -> dict[str, Any]:
        r = await self.client.get(href, headers=self.auth("auditor"))
        r.raise_for_status()
        return dict(r.json())

    async def until(self, href: str, states: Iterable[str] = DONE, timeout: float = 30) -> dict[str, Any]:
        """Poll a command until it is in one of `states`."""
        wanted = set(states)
        async with asyncio.timeout(timeout):
            while True:
                command = await self.command(href)
                if command["state"] in wanted:
                    return command
                await asyncio.sleep(0.02)  # polling another process's API for a state change

    async def commands(self, **params: Any) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        cursor = None
        while True:
            query = {**params, "limit": 1000, **({"before": cursor} if cursor else {})}
            page = (await self.client.get("/commands", params=query, headers=self.auth("auditor"))).json()
            out += page["commands"]
            cursor = page["next"]
            if cursor is None:
                return out
