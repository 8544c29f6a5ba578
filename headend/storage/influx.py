"""InfluxStore: readings in InfluxDB over its HTTP API.

Writes go to the 1.x `/write` endpoint (line protocol), which InfluxDB 2.x and 3.x also
serve for compatibility, or optionally to `/api/v2/write` with a token. Queries use
InfluxQL over `/query`, chunked so large ranges never hit the server's row limit.
Line protocol is written here (`to_line`), held by the tests to the text influxdb-client's
`Point` writes for the same reading, with the escaping done once per series and string.

Schema: measurement = reading kind (`interval`, `register`, `event`); tags `meter`,
`channel` (a point's identity is measurement, meter, channel and time: nothing that can
change between two reads of one interval is a tag); fields `value` (absent for a marked
gap), `raw` (absent where the meter gave none), `scaler`, `multiplier`, `unit`, `quality`
(comma-joined IEC 61968-9 codes), `source`, `collected_at` (epoch ns). docs/storage.md says
why no field is left out at its default.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, Literal

import httpx
import msgspec
import numpy as np

from headend.model import Obis, Reading, ReadingKind, parse_obis
from headend.storage.base import ReadingStore, StoreError, StoreRejected, StoreUnavailable
from headend.storage.codec import from_ns, to_ns
from headend.storage.columns import Columns
from headend.storage.series import Series, of_readings

_CHUNK_SIZE = 10_000


_ESCAPE_KEY = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n", "\t": r"\t", "\r": r"\r"})
_ESCAPE_STRING = str.maketrans({'"': r'\"', "\\": r"\\"})


@lru_cache(maxsize=65_536)
def _series(kind: str, meter: str, channel: Obis) -> str:
    """`kind,channel=...,meter=... `: the same for every point of a series, escaped once."""
    tags = []
    for key, value in (("channel", str(channel)), ("meter", meter)):
        escaped = value.translate(_ESCAPE_KEY)
        if escaped.endswith("\\"):
            escaped += " "
        if escaped:
            tags.append(f"{key}={escaped}")
    return kind.translate(_ESCAPE_KEY) + ("," if tags else "") + ",".join(tags) + " "


@lru_cache(maxsize=65_536)
def _string(text: str) -> str:
    return '"' + text.translate(_ESCAPE_STRING) + '"'


def _number(value: float) -> str:
    # As influxdb-client writes a float: its repr, without a trailing ".0".
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def series_lines(s: Series) -> list[str]:
    """The series' points in line protocol, as influxdb-client's Point writes them (fields in
    key order); the series part and the texts a series shares are escaped once.

    Every field is written on every point (only `raw` and `value` are left out where a point
    has none): InfluxDB merges the fields of a point written again, so a field left out at
    its default would keep the value of an earlier write (a multiplier of 40 on an interval
    re-read after the CT ratio was corrected)."""
    prefix = _series(s.kind, s.meter, s.channel) + "collected_at="
    multiplier = f"i,multiplier={_number(s.multiplier)},quality="
    texts = f",source={_string(s.source)},unit={_string(s.unit)}"
    lines = []
    for t, v, raw, scaler, q, c in zip(s.times, s.values, s.raws, s.scalers, s.qualities, s.collected, strict=True):
        head = f"{prefix}{c}{multiplier}"
        # Inlined: this loop runs once per value written (a tenth of serve's time under ingest).
        if raw is None:
            middle = f",scaler={scaler}i{texts}"
        else:
            r = repr(raw)
            middle = f",raw={r[:-2] if r[-2:] == '.0' else r},scaler={scaler}i{texts}"
        if v is None:
            lines.append(f"{head}{_string(q)}{middle} {t}")
        else:
            r = repr(v)
            lines.append(f"{head}{_string(q)}{middle},value={r[:-2] if r[-2:] == '.0' else r} {t}")
    return lines


def to_line(r: Reading) -> str:
    """One reading's point (see `series_lines`)."""
    return series_lines(of_readings([r])[0])[0]


def influxql_string(text: str) -> str:
    """A single-quoted InfluxQL string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _reading_from_row(kind: ReadingKind, row: dict[str, Any]) -> Reading:
    quality = row.get("quality") or ""
    return Reading(
        kind=kind,
        meter=row["meter"],
        channel=parse_obis(row["channel"]),
        timestamp=from_ns(int(row["time"])),
        value=None if row.get("value") is None else float(row["value"]),
        raw=None if row.get("raw") is None else float(row["raw"]),
        scaler=int(row.get("scaler") or 0),
        multiplier=float(row.get("multiplier") or 1.0),
        unit=row.get("unit") or "",
        qualities=tuple(quality.split(",")) if quality else (),
        source=row.get("source") or "",
        collected_at=from_ns(int(row.get("collected_at") or 0)),
    )


def _answer_series(text: str) -> Iterator[tuple[dict[str, Any], list[str], list[list[Any]]]]:
    """(tags, columns, values) of each series of a chunked InfluxQL JSON answer (one statement)."""
    for line in text.splitlines():
        if not line.strip():
            continue
        doc = msgspec.json.decode(line)
        if "error" in doc:
            raise StoreError(f"InfluxDB query failed: {doc['error']}")
        for result in doc.get("results", []):
            if "error" in result:
                raise StoreError(f"InfluxDB query failed: {result['error']}")
            for series in result.get("series", []):
                yield series.get("tags", {}), series["columns"], series.get("values", [])


def _series_rows(text: str) -> list[dict[str, Any]]:
    """The rows of a chunked InfluxQL JSON answer (one statement), tags merged in."""
    return [{**tags, **dict(zip(columns, values, strict=True))} for tags, columns, rows in _answer_series(text)
            for values in rows]  # fmt: skip


def _columns(text: str) -> Columns:
    """An answer to SELECT "value", "multiplier", "quality" as columns, without a dict per row."""
    parts: list[Columns] = []
    for _tags, columns, rows in _answer_series(text):
        if not rows:
            continue
        by_name = dict(zip(columns, zip(*rows, strict=True), strict=True))
        multiplier = np.array(by_name["multiplier"], dtype=np.float64)  # None (not written): NaN
        multiplier[np.isnan(multiplier)] = 1.0
        quality = np.array([q or "" for q in by_name["quality"]], dtype=object)
        parts.append(Columns(np.array(by_name["time"], dtype=np.int64), np.array(by_name["value"], dtype=np.float64),
                             multiplier, quality))  # fmt: skip
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return Columns.empty()
    return Columns(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("ts", "value", "multiplier", "quality")))


class InfluxStore(ReadingStore):
    def __init__(
        self,
        url: str,
        database: str = "headend",
        *,
        api: Literal["v1", "v2"] = "v1",
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        org: str | None = None,
        bucket: str | None = None,
        timeout: float = 10.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if api == "v2" and not (token and org and bucket):
            raise ValueError("the v2 write API needs token, org and bucket")
        self.url = url.rstrip("/")
        self.database = database
        self.api = api
        self._auth = (username, password or "") if username else None
        self._token = token
        self._org = org
        self._bucket = bucket
        self._timeout = timeout
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    def __repr__(self) -> str:  # never show credentials
        return f"InfluxStore({self.url!r}, database={self.database!r}, api={self.api!r})"

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.url, timeout=self._timeout, auth=self._auth, transport=self._transport
            )
        return self._client

    async def open(self) -> None:
        if self.api == "v1":
            await self._influxql(f'CREATE DATABASE "{self.database}"', method="POST")

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _post(self, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self.client.post(path, **kwargs)
        except httpx.HTTPError as exc:
            raise StoreUnavailable(f"InfluxDB at {self.url}: {type(exc).__name__}: {exc}") from exc

    async def write(self, batch: Sequence[Reading]) -> None:
        await self.write_series(of_readings(batch))

    async def write_series(self, batch: Sequence[Series]) -> None:
        if not batch:
            return
        body = "\n".join(line for s in batch for line in series_lines(s)).encode()
        if self.api == "v2":
            response = await self._post(
                "/api/v2/write",
                params={"org": self._org, "bucket": self._bucket, "precision": "ns"},
                headers={"Authorization": f"Token {self._token}", "Content-Type": "text/plain; charset=utf-8"},
                content=body,
            )
        else:
            response = await self._post("/write", params={"db": self.database, "precision": "ns"}, content=body)
        if response.status_code in (200, 204):
            return
        reason = f"InfluxDB write answered {response.status_code}: {response.text[:300]}"
        if response.status_code == 404 and "database not found" in response.text and self.api == "v1":
            await self.open()
            raise StoreUnavailable(reason + " (database created, will retry)")
        if response.status_code in (400, 413, 422):
            raise StoreRejected(reason)
        raise StoreUnavailable(reason)

    async def _influxql(self, q: str, *, method: str = "GET") -> list[dict[str, Any]]:
        """Run InfluxQL; return the series of the (single) statement, merged across chunks."""
        text = await self._influxql_text(q, method=method)
        # Decoding a large answer is CPU: off the event loop.
        return await asyncio.to_thread(_series_rows, text)

    async def _influxql_text(self, q: str, *, method: str = "GET") -> str:
        """Run InfluxQL; the answer's text (chunked JSON), errors raised."""
        params = {"db": self.database, "q": q, "epoch": "ns", "chunked": "true", "chunk_size": str(_CHUNK_SIZE)}
        try:
            if method == "POST":
                response = await self.client.post("/query", data=params)
            else:
                response = await self.client.get("/query", params=params)
        except httpx.HTTPError as exc:
            raise StoreUnavailable(f"InfluxDB at {self.url}: {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 500:
            raise StoreUnavailable(f"InfluxDB query answered {response.status_code}: {response.text[:300]}")
        if response.status_code != 200:
            raise StoreError(f"InfluxDB query answered {response.status_code}: {response.text[:300]}")
        return response.text

    def _where(self, meter: str, channel: Obis) -> str:
        return f'"meter" = {influxql_string(meter)} AND "channel" = {influxql_string(str(channel))}'

    async def query(
        self,
        meter: str,
        channel: Obis,
        start: datetime,
        end: datetime,
        kind: ReadingKind = "interval",
    ) -> list[Reading]:
        q = (
            f'SELECT * FROM "{kind}" WHERE {self._where(meter, channel)} '
            f"AND time > {to_ns(start)} AND time <= {to_ns(end)} ORDER BY time ASC"
        )
        rows = await self._influxql(q)
        return await asyncio.to_thread(lambda: [_reading_from_row(kind, row) for row in rows])

    async def query_columns(self, meter: str, channel: Obis, start: datetime, end: datetime,
                            kind: ReadingKind = "interval") -> Columns:  # fmt: skip
        q = (f'SELECT "value", "multiplier", "quality" FROM "{kind}" WHERE {self._where(meter, channel)} '
             f"AND time > {to_ns(start)} AND time <= {to_ns(end)} ORDER BY time ASC")  # fmt: skip
        return await asyncio.to_thread(_columns, await self._influxql_text(q))

    async def last_interval(self, meter: str, channel: Obis) -> datetime | None:
        # `quality` is written on every point (possibly empty), so last() sees every interval.
        rows = await self._influxql(f'SELECT last("quality") FROM "interval" WHERE {self._where(meter, channel)}')
        return from_ns(int(rows[0]["time"])) if rows else None

    async def latest_intervals(self, channels: Sequence[Obis]) -> dict[tuple[str, Obis], datetime]:
        if not channels:
            return {}
        wanted = {str(c): c for c in channels}
        which = " OR ".join(f'"channel" = {influxql_string(c)}' for c in wanted)
        rows = await self._influxql(f'SELECT last("quality") FROM "interval" WHERE {which} GROUP BY "meter", "channel"')
        return {(row["meter"], wanted[row["channel"]]): from_ns(int(row["time"])) for row in rows}

    async def interval_times(self, meters: Sequence[str], channel: Obis, start: datetime,
                             end: datetime) -> dict[str, set[datetime]]:  # fmt: skip
        # One query for the fleet: "value" is written only where there is one.
        rows = await self._influxql(
            f'SELECT "value" FROM "interval" WHERE "channel" = {influxql_string(str(channel))} '
            f'AND time > {to_ns(start)} AND time <= {to_ns(end)} GROUP BY "meter"'
        )

        def times() -> dict[str, set[datetime]]:
            out: dict[str, set[datetime]] = {m: set() for m in meters}
            for row in rows:
                if row["meter"] in out and row.get("value") is not None:
                    out[row["meter"]].add(from_ns(int(row["time"])))
            return out

        return await asyncio.to_thread(times)

    async def count(self, kind: ReadingKind = "interval") -> int:
        """Points of a measurement across all meters (for tests and the benchmark)."""
        rows = await self._influxql(f'SELECT count("quality") FROM "{kind}"')
        return int(rows[0]["count"]) if rows else 0
