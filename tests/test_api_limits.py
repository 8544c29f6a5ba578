"""The API as attacked, against `headend serve` as a process: a huge body without a token is
refused before it is read, a slow client is cut off, a revoked token stops working without
a restart, and the site's status needs a token."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

import pytest

from headend.api.auth import TokenStore
from headend.localservers import free_port
from tests.conftest import Spawn
from tests.serving import Served, issue_tokens
from tests.sites import write_site


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@pytest.fixture
async def served(tmp_path: Path, spawn: Spawn) -> Served:
    tokens = issue_tokens(tmp_path)
    port = free_port()
    write_site(tmp_path, port, "", api='header_timeout = "1s"\nbody_timeout = "2s"\nmax_body = 65536')
    server = Served(tmp_path, f"http://127.0.0.1:{port}", tokens, spawn)
    await server.start()
    yield server  # type: ignore[misc]
    await server.stop()


async def closed(writer: asyncio.StreamWriter) -> None:
    """Close and wait for it: a socket left for the garbage collector warns in a later test."""
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def raw(port: int, head: bytes, body_chunks: int = 0, chunk: bytes = b"x" * 65536) -> tuple[bytes, int]:
    """Send `head`, then up to `body_chunks` chunks while the server keeps reading; return the
    answer and how many chunks went out before it came."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    sent = 0
    answer = b""
    try:
        for sent in range(body_chunks):  # noqa: B007 - how far it got is the point
            with contextlib.suppress(TimeoutError):
                answer = await asyncio.wait_for(reader.read(4096), 0.001)
            if answer:
                break
            writer.write(chunk)
            await writer.drain()
        if not answer:
            answer = await asyncio.wait_for(reader.read(4096), 10)
    except ConnectionError:
        pass
    await closed(writer)
    return answer, sent


async def test_a_huge_body_without_a_token_is_refused_before_it_is_read(served: Served) -> None:
    assert served.proc is not None
    port = int(served.url.rsplit(":", 1)[1])
    before = rss_kib(served.proc.pid)
    head = (b"POST /commands/bulk HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 314572800\r\n\r\n")  # fmt: skip
    answer, sent = await raw(port, head, body_chunks=4800)  # up to 300 MiB
    assert answer.startswith(b"HTTP/1.1 401"), answer[:100]
    assert sent < 4800, "answered before the body was sent"
    token = served.tokens["anna"].encode()
    with_token = head.replace(b"Host: x\r\n", b"Host: x\r\nAuthorization: Bearer " + token + b"\r\n")
    answer, _ = await raw(port, with_token, body_chunks=4800)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    chunked = (b"POST /commands/bulk HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token +
               b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")  # fmt: skip
    answer, _ = await raw(port, chunked, body_chunks=100, chunk=b"10000\r\n" + b"x" * 65536 + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    assert rss_kib(served.proc.pid) - before < 20_000
    assert (await served.client.get("/health")).status_code == 200


async def test_a_client_sending_headers_slowly_is_cut_off(served: Served) -> None:
    port = int(served.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    began = time.monotonic()
    writer.write(b"GET /health HTTP/1.1\r\n")
    cut = False
    async with asyncio.timeout(15):
        while not cut:
            writer.write(b"X-Slow: a\r\n")  # one header line every 200 ms, never the blank line
            try:
                await writer.drain()
                cut = await asyncio.wait_for(reader.read(1), 0.2) == b""
            except TimeoutError:
                continue
            except ConnectionError:
                cut = True
    assert time.monotonic() - began < 10  # header_timeout is 1 s here
    await closed(writer)


async def test_a_slow_body_gets_408(served: Served) -> None:
    port = int(served.url.rsplit(":", 1)[1])
    token = served.tokens["anna"].encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /commands/bulk HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token +
                 b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")  # fmt: skip
    answer = await asyncio.wait_for(reader.read(4096), 15)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    await closed(writer)


async def test_a_revoked_token_stops_working_without_a_restart_and_status_needs_one(served: Served) -> None:
    tokens_file = served.directory / "tokens.toml"
    assert os.stat(tokens_file).st_mode & 0o777 == 0o600
    assert (await served.client.get("/status")).status_code == 401
    assert (await served.client.get("/status", headers=served.auth("auditor"))).status_code == 200
    # Revoke anna: write the file again without her entry, as an administrator would.
    kept = TokenStore.load(tokens_file)
    text = tokens_file.read_text()
    entries = [e for e in text.split("[[tokens]]") if e.strip() and 'name = "anna"' not in e]
    tokens_file.write_text("".join(f"[[tokens]]{e}" for e in entries))
    assert kept.authenticate(served.tokens["anna"]) is None, "the store reads the file again"
    assert (await served.client.get("/commands", headers=served.auth("anna"))).status_code == 401
    assert (await served.client.get("/commands", headers=served.auth("auditor"))).status_code == 200
    # An edit with a typo must not keep a token it meant to revoke: nobody gets in until it is fixed.
    tokens_file.write_text(tokens_file.read_text() + '\n[[tokens]]\nname = "x"\nsha256 = "00"\nroles = ["readonly"]\n')
    assert kept.authenticate(served.tokens["auditor"]) is None
    assert (await served.client.get("/commands", headers=served.auth("auditor"))).status_code == 401


async def test_idle_connections_do_not_starve_the_api(served: Served) -> None:
    port = int(served.url.rsplit(":", 1)[1])
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(250)]
    try:
        assert (await served.client.get("/status", headers=served.auth("auditor"))).status_code == 200
        assert (await served.client.get("/health")).status_code == 200
    finally:
        for _reader, writer in idle:
            await closed(writer)
