"""The optional v2 write API. InfluxDB 2.x cannot run here (Debian ships 1.6), so the HTTP
exchange is checked against a recording transport: path, token header, org/bucket, body."""

from __future__ import annotations

import httpx
import pytest

from headend.storage.base import StoreRejected, StoreUnavailable
from headend.storage.influx import InfluxStore
from tests.factories import intervals


def recording_store(status: int, seen: list[httpx.Request]) -> InfluxStore:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status, text="" if status == 204 else '{"code":"invalid"}')

    return InfluxStore(
        "http://influx.invalid:8086",
        api="v2",
        token="s3cret",
        org="utility",
        bucket="ami",
        transport=httpx.MockTransport(handler),
    )


async def test_v2_write_sends_token_org_bucket_and_line_protocol() -> None:
    seen: list[httpx.Request] = []
    store = recording_store(204, seen)
    await store.open()
    await store.write(list(intervals(1, 0, 3)))
    await store.close()
    (request,) = seen
    assert request.url.path == "/api/v2/write"
    assert dict(request.url.params) == {"org": "utility", "bucket": "ami", "precision": "ns"}
    assert request.headers["Authorization"] == "Token s3cret"
    lines = request.content.decode().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("interval,channel=1-0:1.8.0.255,meter=M001 ")
    assert "s3cret" not in repr(store)


async def test_v2_write_maps_http_errors() -> None:
    with pytest.raises(StoreRejected):
        await recording_store(400, []).write(list(intervals(1, 0, 1)))
    with pytest.raises(StoreUnavailable):
        await recording_store(503, []).write(list(intervals(1, 0, 1)))
    with pytest.raises(StoreUnavailable):
        await recording_store(401, []).write(list(intervals(1, 0, 1)))


def test_v2_needs_token_org_and_bucket() -> None:
    with pytest.raises(ValueError, match="token, org and bucket"):
        InfluxStore("http://127.0.0.1:8086", api="v2", token="x")
