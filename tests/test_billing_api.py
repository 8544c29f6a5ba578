"""The billing API over a simulated month of 100 meters with injected faults: each fault is
flagged at its intervals and nowhere else, nothing suspect or missing is exported as actual,
estimates add up to the register; plus the API's own rules (auth, limits, CSV, edits)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from headend.api.auth import TokenStore
from headend.api.billing import billing_router
from headend.config import parse_config
from headend.model import EXPORT_ENERGY, IMPORT_ENERGY, IMPORT_INTERVAL, Reading
from headend.registry import Registry
from headend.storage.sqlite import SqliteStore
from headend.vee.service import VeeService
from headend.vee.store import VeeStore
from tests.vee_data import PER_DAY, STEP, T0, cumulative, deltas, load, registers_of, t_of

HISTORY_DAYS, MONTH_DAYS = 7, 30
HISTORY, MONTH = HISTORY_DAYS * PER_DAY, MONTH_DAYS * PER_DAY
START = T0 + timedelta(days=HISTORY_DAYS)
END = START + MONTH * STEP
METERS = [f"M{i:03d}" for i in range(100)]
CT_METER = "M004"  # registered with a 100/5 CT


@dataclass
class Fault:
    meter: str
    source: str  # cumulative | deltas
    change: Any  # (interval index, value) -> value
    expected: set[int]  # interval indexes inside the month that must be flagged
    extra: list[Reading] = field(default_factory=list)


def month_k(day: int, interval: int = 0) -> int:
    """Interval index (from T0) of an interval in the month."""
    return HISTORY + day * PER_DAY + interval


GAP = month_k(3, 40)
SPIKE = month_k(12, 50)
ROLLBACK = month_k(18, 30)
WRONG_CT_FROM = month_k(10)
JUMP = month_k(20, 60)
FAULTS = {
    "M001": Fault("M001", "cumulative", lambda k, v: None if GAP <= k < GAP + 4 else v, set(range(GAP, GAP + 5))),
    "M002": Fault("M002", "deltas", lambda k, v: v * 5 if k == SPIKE else v, {SPIKE}),
    "M003": Fault("M003", "cumulative", lambda k, v: v - 50.0 if k >= ROLLBACK else v, {ROLLBACK}),
    # The CT is 100/5 (x20) but from day 10 the reads came in with multiplier 1: the
    # multiplier rule flags each of them; the day totals are also far below their like days.
    CT_METER: Fault(CT_METER, "deltas", lambda k, v: v / 20 if k >= WRONG_CT_FROM else v,
                    set(range(WRONG_CT_FROM, HISTORY + MONTH))),
    # The clock jumped 7 minutes ahead for two hours: those reads are off the grid.
    "M005": Fault("M005", "deltas", lambda k, v: None if JUMP <= k < JUMP + 8 else v, set(range(JUMP, JUMP + 9)),
                  extra=[Reading("M005", IMPORT_INTERVAL, t_of(k) + timedelta(minutes=7),
                                 load(k, 5), unit="kWh") for k in range(JUMP, JUMP + 8)]),
}


PV = [f"M{i:03d}" for i in range(90, 100)]  # customers with solar panels: billed on import and export
NO_DATA = "M999"  # registered, never read


def export_wh(n: int, seed: int) -> list[int]:
    """The export register (Wh, as the meter counts) at the end of interval k-1, k = 0..n:
    up to 400 Wh a quarter hour around noon, nothing at night."""
    values = [5_000_000 + 1000 * seed]
    for k in range(n):
        hour = (k % PER_DAY) / 4
        values.append(values[-1] + max(0, round(400 * math.sin(math.pi * (hour - 6) / 12))) * (6 <= hour <= 18))
    return values


def export_readings(meter: str, n: int, seed: int) -> list[Reading]:
    """The export load profile, and the export register frozen at each midnight (the meter's
    daily billing profile, as the DLMS client names its source)."""
    values = export_wh(n, seed)
    profile = [Reading.from_raw(meter, EXPORT_ENERGY, t_of(k - 1), wh, scaler=-3, unit="kWh")
               for k, wh in enumerate(values)]  # fmt: skip
    frozen = [Reading.from_raw(meter, EXPORT_ENERGY, t_of(k - 1), wh, scaler=-3, unit="kWh", kind="register",
                               source="dlms/sim:4059 billing-daily 0-0:98.1.0.255")
              for k, wh in enumerate(values) if k % PER_DAY == 0]  # fmt: skip
    return profile + frozen


def month_of(meter: str, i: int) -> list[Reading]:
    n = HISTORY + MONTH
    fault = FAULTS.get(meter)
    change = fault.change if fault else None
    source = fault.source if fault else ("cumulative" if i % 2 else "deltas")
    if source == "cumulative":
        return cumulative(meter, n, seed=i, change=change) + (export_readings(meter, n, i) if meter in PV else [])
    multiplier = 20.0 if meter == CT_METER else 1.0
    readings = deltas(meter, n, seed=i, multiplier=multiplier, change=change)
    if meter == CT_METER:  # what the wrong configuration stored: multiplier 1 from day 10 on
        readings = [r if r.timestamp <= t_of(WRONG_CT_FROM - 1) else Reading(
            r.meter, r.channel, r.timestamp, r.value, unit="kWh", multiplier=1.0) for r in readings]  # fmt: skip
    if meter in ("M010", "M012"):  # daily register reads too: the sum check has work to do
        totals = registers_of(n, seed=i)
        readings += [Reading(meter, IMPORT_ENERGY, T0 + timedelta(days=d, seconds=30), totals[d * PER_DAY],
                             kind="register", unit="kWh") for d in range(HISTORY_DAYS + MONTH_DAYS + 1)]  # fmt: skip
    if meter in PV:
        readings += export_readings(meter, n, i)
    return readings + (fault.extra if fault else [])


@dataclass
class Billing:
    client: httpx.AsyncClient
    vee: VeeService
    tokens: dict[str, str]

    def auth(self, who: str = "billing") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}


@pytest.fixture(scope="module")
def month_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The month written once for the module (each test gets its own versions store)."""
    path = tmp_path_factory.mktemp("month") / "readings.sqlite"

    async def write() -> None:
        async with SqliteStore(path) as store:
            for i, meter in enumerate(METERS):
                await store.write(month_of(meter, i))

    asyncio.run(write())
    return path


@pytest.fixture
async def billing(month_db: Path, tmp_path: Path) -> AsyncIterator[Billing]:
    month_store = SqliteStore(month_db)
    await month_store.open()
    link = {"id": "l", "kind": "tcp", "protocol": "dlms-wrapper", "host": "h", "port": 1}
    meters = [{"id": m, "link": "l"} for m in [*METERS, NO_DATA]]
    meters[4]["ct"] = {"primary": 100, "secondary": 5}
    cfg = parse_config({"links": [link], "meters": meters})
    versions = VeeStore(tmp_path / "vee.sqlite")
    vee = VeeService(month_store, versions, Registry(cfg), cfg.vee)
    token_file = tmp_path / "tokens.toml"
    tokens = {name: TokenStore.issue(token_file, name, frozenset({role})) for name, role in
              {"billing": "billing", "engineer": "engineer", "operator": "operator"}.items()}  # fmt: skip
    app = FastAPI()
    app.include_router(billing_router(vee, TokenStore.load(token_file)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://headend") as client:
        yield Billing(client, vee, tokens)
    versions.close()
    await month_store.close()


def index_of(timestamp: str) -> int:
    return (datetime.fromisoformat(timestamp) - T0) // STEP - 1


async def test_a_month_of_100_meters_flags_each_fault_where_it_is_and_nowhere_else(billing: Billing) -> None:
    params = {"start": START.isoformat(), "end": END.isoformat(), "meter": METERS}
    r = await billing.client.get("/billing/export", params=params, headers=billing.auth())
    assert r.status_code == 200, r.text
    readings = r.json()["MeterReadings"]
    assert [m["Meter"]["mRID"] for m in readings] == METERS
    for block in readings:
        meter = block["Meter"]["mRID"]
        intervals, *others = block["IntervalBlocks"]
        assert [b["ReadingType"]["energy"] for b in others] == (["export"] if meter in PV else [])
        rows = intervals["IntervalReadings"]
        assert len(rows) == MONTH and intervals["ReadingType"]["intervalLength"] == 900
        flagged = {index_of(x["timeStamp"]) for x in rows if x["validationRules"]}
        expected = FAULTS[meter].expected if meter in FAULTS else set()
        assert flagged == expected, meter
        if meter not in FAULTS:
            assert {x["status"] for x in rows} == {"actual"}, f"{meter}: no false suspects"
        for x in rows:  # never suspect or missing data as actual
            codes = {q["ref"] for q in x["ReadingQualities"]}
            if x["status"] == "actual":
                assert codes & {"2.0.1"} and not any(c.startswith(("2.5.", "2.6.")) for c in codes), (meter, x)
            if x["value"] is None:
                assert x["status"] == "missing"
    by_meter = {m["Meter"]["mRID"]: m["IntervalBlocks"][0]["IntervalReadings"] for m in readings}
    gap = [x for x in by_meter["M001"] if x["status"] == "estimated"]
    totals = registers_of(HISTORY + MONTH, seed=1)
    assert sum(x["value"] for x in gap) == pytest.approx(totals[GAP + 5] - totals[GAP])
    assert all("2.8.0" in {q["ref"] for q in x["ReadingQualities"]} and x["estMethod"] for x in gap)
    spike = next(x for x in by_meter["M002"] if index_of(x["timeStamp"]) == SPIKE)
    assert spike["status"] == "suspect" and {"2.6.1007"} <= {q["ref"] for q in spike["ReadingQualities"]}
    rollback = next(x for x in by_meter["M003"] if index_of(x["timeStamp"]) == ROLLBACK)
    assert rollback["status"] == "estimated"  # a read that went backwards is not billed


async def test_determinants_and_pages_of_one_meter(billing: Billing) -> None:
    period = {"start": START.isoformat(), "end": END.isoformat()}
    d = (await billing.client.get("/billing/meters/M001/determinants", params=period, headers=billing.auth())).json()
    totals = registers_of(HISTORY + MONTH, seed=1)
    assert d["start_register_kwh"] == pytest.approx(totals[HISTORY])
    assert d["end_register_kwh"] == pytest.approx(totals[HISTORY + MONTH])
    assert d["consumption_kwh"] == pytest.approx(totals[HISTORY + MONTH] - totals[HISTORY])
    assert d["by_status"] == {"actual": MONTH - 5, "estimated": 5}
    assert d["completeness_pct"] == pytest.approx(100 * (MONTH - 5) / MONTH, abs=1e-3)
    seen, offset = [], 0
    while offset is not None:
        page = (await billing.client.get("/billing/meters/M001/intervals", params={**period, "limit": 1000,
                                         "offset": offset}, headers=billing.auth())).json()  # fmt: skip
        seen += page["intervals"]
        offset = page["next_offset"]
    assert len(seen) == MONTH and seen[0]["timestamp"] == (START + STEP).isoformat()


async def test_csv_export_marks_status_and_quality(billing: Billing) -> None:
    params = {"start": START.isoformat(), "end": (START + timedelta(days=4)).isoformat(), "meter": ["M001", "M000"],
              "format": "csv"}  # fmt: skip
    r = await billing.client.get("/billing/export", params=params, headers=billing.auth())
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == 2 * 4 * PER_DAY
    estimated = [row for row in rows if row["status"] == "estimated"]
    assert {row["meter"] for row in estimated} == {"M001"} and all("2.8.0" in row["qualities"] for row in estimated)
    assert all(row["value"] for row in rows)


async def test_bad_requests_get_a_reason(billing: Billing) -> None:
    period = {"start": START.isoformat(), "end": END.isoformat()}
    get = billing.client.get
    assert (await get("/billing/meters/M001/intervals", params=period)).status_code == 401
    operator = billing.auth("operator")
    assert (await get("/billing/meters/M001/intervals", params=period, headers=operator)).status_code == 403
    r = await get("/billing/meters/NOPE/intervals", params=period, headers=billing.auth())
    assert r.status_code == 404 and "NOPE" in r.json()["detail"]
    backwards = {"start": END.isoformat(), "end": START.isoformat()}
    r = await get("/billing/meters/M001/intervals", params=backwards, headers=billing.auth())
    assert r.status_code == 422 and "after start" in r.json()["detail"]
    too_long = {"start": START.isoformat(), "end": (START + timedelta(days=90)).isoformat()}
    r = await get("/billing/meters/M001/intervals", params=too_long, headers=billing.auth())
    assert r.status_code == 422 and "ask for it in parts" in r.json()["detail"]
    naive = {"start": "2026-04-01T00:00:00", "end": END.isoformat()}
    assert (await get("/billing/meters/M001/intervals", params=naive, headers=billing.auth())).status_code == 422
    r = await get("/billing/meters/M001/intervals", params={**period, "limit": 100_000}, headers=billing.auth())
    assert r.status_code == 422


async def test_an_edit_is_versioned_and_audited(billing: Billing) -> None:
    t = t_of(SPIKE)
    body = {"timestamp": t.isoformat(), "value": 0.45, "reason": "confirmed with the customer's own reading"}
    assert (await billing.client.post("/billing/meters/M002/intervals/edits", json=body,
                                      headers=billing.auth("engineer"))).status_code == 403  # fmt: skip
    r = await billing.client.post("/billing/meters/M002/intervals/edits", json=body, headers=billing.auth())
    assert r.status_code == 201 and r.json()["version"] == 1
    period = {"start": (t - STEP).isoformat(), "end": t.isoformat()}
    (row,) = (await billing.client.get("/billing/meters/M002/intervals", params=period,
                                       headers=billing.auth())).json()["intervals"]  # fmt: skip
    assert (row["status"], row["value"], row["version"]) == ("edited", 0.45, 1) and "2.7.0" in row["qualities"]
    versions = (await billing.client.get("/billing/meters/M002/intervals/versions", params={"timestamp": t.isoformat()},
                                         headers=billing.auth())).json()["versions"]  # fmt: skip
    assert [(v["by"], v["reason"]) for v in versions] == [("billing", body["reason"])]
    off_grid = {**body, "timestamp": (t + timedelta(minutes=3)).isoformat()}
    r = await billing.client.post("/billing/meters/M002/intervals/edits", json=off_grid, headers=billing.auth())
    assert r.status_code == 422 and "interval end" in r.json()["detail"]


async def test_a_meter_exchange_is_recorded_once(billing: Billing) -> None:
    body = {"timestamp": END.isoformat(), "baseline": 0, "multiplier": 1, "reason": "meter replaced, job 881"}
    first = await billing.client.post("/billing/meters/M007/exchanges", json=body, headers=billing.auth("engineer"))
    assert first.status_code == 201
    again = await billing.client.post("/billing/meters/M007/exchanges", json=body, headers=billing.auth("engineer"))
    assert again.status_code == 409 and "already recorded" in again.json()["detail"]


async def test_a_meter_without_data_gets_no_consumption_and_the_reason_never_a_zero_bill(billing: Billing) -> None:
    period = {"start": START.isoformat(), "end": END.isoformat()}
    d = (await billing.client.get(f"/billing/meters/{NO_DATA}/determinants", params=period,
                                  headers=billing.auth())).json()  # fmt: skip
    assert d["consumption_kwh"] is None and d["start_register_kwh"] is None and d["max_demand_kw"] is None
    assert d["consumption_reason"] == f"no data for the period ({MONTH} intervals missing)"
    assert d["completeness_pct"] == 0 and d["by_status"] == {"missing": MONTH}
    assert list(d["energies"]) == ["import"]


def kwh(wh: int) -> str:
    """Wh as the meter counts them, in kWh to the meter's resolution, as a string."""
    return str(Decimal(wh).scaleb(-3).normalize())


def number(text: str) -> str:
    """A JSON or CSV number as written, normalised the same way (12.300 and 12.3 are equal)."""
    return str(Decimal(text).normalize())


async def test_pv_customers_are_billed_on_import_and_export_at_the_meters_own_resolution(billing: Billing) -> None:
    """Every export value served is the meter's register difference to the Wh, compared as
    text: no binary float noise in JSON or CSV."""
    period = {"start": START.isoformat(), "end": END.isoformat()}
    meter, seed = PV[0], METERS.index(PV[0])
    registers = export_wh(HISTORY + MONTH, seed)
    r = await billing.client.get(f"/billing/meters/{meter}/determinants", params=period, headers=billing.auth())
    raw = json.loads(r.text, parse_float=str)  # the numbers as written
    assert set(raw["energies"]) == {"import", "export"}
    export = raw["energies"]["export"]
    assert number(export["start_register_kwh"]) == kwh(registers[HISTORY])
    assert export["start_register_source"] == export["end_register_source"] == "billing profile daily 0-0:98.1.0.255"
    assert number(export["end_register_kwh"]) == kwh(registers[HISTORY + MONTH])
    assert number(export["consumption_kwh"]) == kwh(registers[HISTORY + MONTH] - registers[HISTORY])
    assert export["register_channel"] == "1-0:2.8.0.255" and export["completeness_pct"] == "100.0"
    page = await billing.client.get(f"/billing/meters/{meter}/intervals", headers=billing.auth(),
                                    params={**period, "energy": "export", "limit": 200})  # fmt: skip
    values = [x["value"] for x in json.loads(page.text, parse_float=str, parse_int=str)["intervals"]]
    expected = [kwh(registers[HISTORY + k + 1] - registers[HISTORY + k]) for k in range(200)]
    assert [number(v) for v in values] == expected
    csv_params = {**period, "meter": [meter], "format": "csv"}
    rows = list(csv.DictReader(io.StringIO((await billing.client.get("/billing/export", params=csv_params,
                                                                      headers=billing.auth())).text)))  # fmt: skip
    exported = [row["value"] for row in rows if row["channel"] == "1-0:2.29.0.255"]
    assert len(exported) == MONTH and [number(v) for v in exported[:200]] == expected
    assert all(len(v.split(".")[-1]) <= 3 for v in exported), "no more decimals than the meter has"
