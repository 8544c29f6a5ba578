"""The billing API: validated, quality-flagged interval data, registers, determinants, bulk
export after IEC 61968-9 MeterReadings, and versioned edits.

Roles: `billing` and `engineer` read; `billing` edits; `engineer` records meter exchanges.
Periods are `start < t <= end` in UTC (interval-ending), at most `vee.max_period` long.
Every interval carries a status; `actual` is only ever a read that passed every rule.
"""

import csv
import io
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi.responses import StreamingResponse
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field

from headend.api.auth import Principal, TokenStore
from headend.api.security import require_roles
from headend.model import IMPORT_ENERGY, IMPORT_INTERVAL
from headend.registry import UnknownMeter
from headend.vee.series import Exchange
from headend.vee.service import Determinants, ValidatedInterval, Validation, VeeService
from headend.vee.store import DuplicateExchange

#: IEC 61968-9 ReadingType of the billing channel: 15-minute, delta data, forward, active energy, kWh.
READING_TYPE_15MIN_KWH = "0.0.2.4.1.1.12.0.0.0.0.0.0.0.0.3.72.0"
MAX_PAGE = 10_000
MAX_EXPORT_METERS = 1_000

EARLIEST, LATEST = datetime(1970, 1, 2, tzinfo=UTC), datetime(2200, 1, 1, tzinfo=UTC)


def _in_range(t: datetime) -> datetime:
    if not EARLIEST <= t <= LATEST:
        raise ValueError(f"{t.isoformat()} is outside {EARLIEST.year}..{LATEST.year}")
    return t.astimezone(UTC)


Stamp = Annotated[AwareDatetime, AfterValidator(_in_range)]
Start = Annotated[Stamp, Query(description="period start (exclusive), ISO 8601 with offset")]
End = Annotated[Stamp, Query(description="period end (inclusive), ISO 8601 with offset")]


class EditIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    timestamp: Stamp
    value: float = Field(ge=0, le=1e9, allow_inf_nan=False)
    reason: str = Field(min_length=3, max_length=500)


class ExchangeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    timestamp: Stamp
    baseline: float = Field(ge=0, le=1e12, allow_inf_nan=False)
    multiplier: float = Field(gt=0, le=1e6, allow_inf_nan=False)
    reason: str = Field(min_length=3, max_length=500)


def interval_json(i: ValidatedInterval) -> dict[str, Any]:
    return {
        "timestamp": i.t.isoformat(),
        "value": i.value,
        "status": i.status,
        "qualities": list(i.qualities),
        "rules": list(i.rules),
        "version": i.version,
        "est_method": i.method if i.status == "estimated" else None,
    }


def determinants_json(d: Determinants) -> dict[str, Any]:
    return {
        "meter": d.meter,
        "start": d.start.isoformat(),
        "end": d.end.isoformat(),
        "start_register_kwh": d.start_register,
        "end_register_kwh": d.end_register,
        "consumption_kwh": d.consumption_kwh,
        "max_demand_kw": d.max_demand_kw,
        "max_demand_at": d.max_demand_at.isoformat() if d.max_demand_at else None,
        "expected_intervals": d.expected_intervals,
        "completeness_pct": round(100 * d.completeness, 3),
        "by_status": d.by_status,
        "by_quality": d.by_quality,
    }


def meter_readings_json(v: Validation) -> dict[str, Any]:
    """One meter's period shaped after IEC 61968-9 MeterReadings (IntervalBlocks, Readings)."""
    return {
        "Meter": {"mRID": v.meter},
        "valuesInterval": {"start": v.start.isoformat(), "end": v.end.isoformat()},
        "IntervalBlocks": [{
            "ReadingType": {"ref": READING_TYPE_15MIN_KWH, "channel": str(IMPORT_INTERVAL), "unit": v.unit,
                            "intervalLength": int(v.step.total_seconds())},
            "IntervalReadings": [{
                "timeStamp": i.t.isoformat(), "value": i.value, "status": i.status, "version": i.version,
                "estMethod": i.method if i.status == "estimated" else None,
                "ReadingQualities": [{"ref": q} for q in i.qualities],
                "validationRules": list(i.rules),
            } for i in v.intervals],
        }],
        "Readings": [{
            "ReadingType": {"channel": str(IMPORT_ENERGY), "unit": r.unit}, "timeStamp": r.timestamp.isoformat(),
            "value": r.value, "ReadingQualities": [{"ref": q} for q in r.qualities],
        } for r in v.registers],
    }  # fmt: skip


CSV_COLUMNS = ["meter", "channel", "timestamp", "value", "unit", "status", "qualities", "rules", "version",
               "est_method"]  # fmt: skip


def billing_router(vee: VeeService, tokens: TokenStore) -> APIRouter:
    router = APIRouter(prefix="/billing", tags=["billing"])
    Reader = Annotated[Principal, Depends(require_roles(tokens, "billing", "engineer"))]
    Editor = Annotated[Principal, Depends(require_roles(tokens, "billing"))]
    Engineer = Annotated[Principal, Depends(require_roles(tokens, "engineer"))]

    def period(start: datetime, end: datetime) -> None:
        if end <= start:
            raise HTTPException(422, "end must be after start")
        if end - start > vee.cfg.max_period:
            reason = f"period longer than the {vee.cfg.max_period} allowed; ask for it in parts"
            raise HTTPException(422, reason)

    def known(meter_id: str) -> str:
        try:
            return vee.registry.meter(meter_id).id
        except UnknownMeter as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None

    @router.get("/meters/{meter_id}/intervals")
    async def intervals(
        meter_id: str, start: Start, end: End, _who: Reader,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 3000,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict[str, Any]:  # fmt: skip
        """Validated intervals of the billing channel, with status, qualities, rules and version."""
        period(start, end)
        v = await vee.validate(known(meter_id), start, end)
        page = v.intervals[offset : offset + limit]
        more = offset + limit < len(v.intervals)
        return {
            "meter": v.meter, "channel": str(IMPORT_INTERVAL), "unit": v.unit,
            "interval_s": int(v.step.total_seconds()), "start": v.start.isoformat(), "end": v.end.isoformat(),
            "total": len(v.intervals), "offset": offset, "limit": limit,
            "next_offset": offset + limit if more else None, "counts": v.counts(),
            "intervals": [interval_json(i) for i in page],
        }  # fmt: skip

    @router.get("/meters/{meter_id}/registers")
    async def registers(meter_id: str, start: Start, end: End, _who: Reader) -> dict[str, Any]:
        """Energy register reads in the period, as read (version 0), with their qualities."""
        period(start, end)
        reads = await vee.store.query(known(meter_id), IMPORT_ENERGY, start, end, kind="register")
        return {"meter": meter_id, "channel": str(IMPORT_ENERGY), "registers": [
            {"timestamp": r.timestamp.isoformat(), "value": r.value, "unit": r.unit, "qualities": list(r.qualities),
             "raw": r.raw, "multiplier": r.multiplier, "version": 0} for r in reads]}  # fmt: skip

    @router.get("/meters/{meter_id}/determinants")
    async def determinants(meter_id: str, start: Start, end: End, _who: Reader) -> dict[str, Any]:
        """Start/end register, consumption, max demand, completeness and counts by quality."""
        period(start, end)
        return determinants_json(await vee.determinants(known(meter_id), start, end))

    @router.get("/export", response_model=None)
    async def export(
        start: Start, end: End, _who: Reader,
        meter: Annotated[list[str], Query(min_length=1, max_length=MAX_EXPORT_METERS)],
        format: Literal["json", "csv"] = "json",
    ) -> StreamingResponse:  # fmt: skip
        """Validated data of many meters: JSON shaped after IEC 61968-9 MeterReadings, or CSV.
        Streamed meter by meter, so a large export holds one meter's month in memory at a time."""
        period(start, end)
        ids = [known(m) for m in dict.fromkeys(meter)]
        if format == "json":
            return StreamingResponse(_json_export(ids, start, end), media_type="application/json")
        return StreamingResponse(_csv_export(ids, start, end), media_type="text/csv")

    async def _json_export(ids: list[str], start: datetime, end: datetime) -> AsyncIterator[bytes]:
        yield b'{"MeterReadings": ['
        for n, meter_id in enumerate(ids):
            v = await vee.validate(meter_id, start, end)
            yield (b"," if n else b"") + json.dumps(meter_readings_json(v)).encode()
        yield b"]}"

    async def _csv_export(ids: list[str], start: datetime, end: datetime) -> AsyncIterator[bytes]:
        yield (",".join(CSV_COLUMNS) + "\n").encode()
        for meter_id in ids:
            v = await vee.validate(meter_id, start, end)
            out = io.StringIO()
            writer = csv.writer(out, lineterminator="\n")
            for i in v.intervals:
                value = "" if i.value is None else repr(i.value)
                writer.writerow([v.meter, str(IMPORT_INTERVAL), i.t.isoformat(), value, v.unit, i.status,
                                 " ".join(i.qualities), " ".join(i.rules), i.version,
                                 i.method if i.status == "estimated" else ""])  # fmt: skip
            yield out.getvalue().encode()

    @router.post("/meters/{meter_id}/intervals/edits", status_code=201)
    async def edit(meter_id: str, body: EditIn, who: Editor) -> dict[str, Any]:
        """Correct one interval. The read stays; the edit is a new version (quality 2.7.0)."""
        try:
            version = await vee.edit(known(meter_id), body.timestamp, body.value, who=who.name, reason=body.reason)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return {"meter": meter_id, "timestamp": body.timestamp.isoformat(), "version": version, "by": who.name}

    @router.get("/meters/{meter_id}/intervals/versions")
    async def versions(meter_id: str, timestamp: Annotated[Stamp, Query()], _who: Reader) -> dict[str, Any]:
        """Every version of one interval after the read: estimates and edits, who and why."""
        found = vee.versions.versions(known(meter_id), IMPORT_INTERVAL, timestamp - vee.cfg.interval, timestamp)
        rows = found.get(timestamp, [])
        return {"meter": meter_id, "timestamp": timestamp.isoformat(), "versions": [
            {"version": v.version, "value": v.value, "status": v.status, "method": v.method,
             "qualities": list(v.qualities), "by": v.author, "reason": v.reason, "at": v.created.isoformat()}
            for v in rows]}  # fmt: skip

    @router.post("/meters/{meter_id}/exchanges", status_code=201)
    async def exchange(meter_id: str, body: ExchangeIn, who: Engineer) -> dict[str, Any]:
        """Record a meter exchange or CT/PT change: the register restarts from `baseline`."""
        meter = known(meter_id)
        try:
            vee.versions.record_exchange(meter, Exchange(body.timestamp, body.baseline, body.multiplier),
                                         author=who.name, reason=body.reason)  # fmt: skip
        except DuplicateExchange as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        return {"meter": meter, "timestamp": body.timestamp.isoformat(), "by": who.name}

    return router
