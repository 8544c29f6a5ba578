"""The billing API: validated, quality-flagged interval data, registers, determinants, bulk
export after IEC 61968-9 MeterReadings, and versioned edits.

Roles: `billing` and `engineer` read; `billing` edits; `engineer` records meter exchanges.
Periods are `start < t <= end` in UTC (interval-ending), at most `vee.max_period` long.
Every interval carries a status; `actual` is only ever a read that passed every rule.
"""

import asyncio
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
from headend.registry import UnknownMeter
from headend.vee.energies import ENERGIES, IMPORT, Energy
from headend.vee.series import Exchange
from headend.vee.service import Determinants, ValidatedInterval, Validation, VeeService
from headend.vee.store import DuplicateExchange

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
EnergyName = Annotated[Literal["import", "export", "reactive_import", "reactive_export"],
                       Query(description="which energy: import (1-0:1.x), export (1-0:2.x), reactive (3.x, 4.x)")]
#: IEC 61968-9 ReadingType of each energy's 15-minute delta channel.
READING_TYPES = {
    "import": "0.0.2.4.1.1.12.0.0.0.0.0.0.0.0.3.72.0",
    "export": "0.0.2.4.19.1.12.0.0.0.0.0.0.0.0.3.72.0",
    "reactive_import": "0.0.2.4.1.1.12.0.0.0.0.0.0.0.0.3.73.0",
    "reactive_export": "0.0.2.4.19.1.12.0.0.0.0.0.0.0.0.3.73.0",
}


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


def energy_json(d: Determinants) -> dict[str, Any]:
    unit = d.energy.unit
    demand = "kw" if unit == "kWh" else "kvar"
    return {
        "register_channel": str(d.energy.register),
        "interval_channel": str(d.energy.interval),
        "unit": unit,
        f"start_register_{unit.lower()}": d.start_register,
        "start_register_source": d.start_register_source,
        f"end_register_{unit.lower()}": d.end_register,
        "end_register_source": d.end_register_source,
        f"consumption_{unit.lower()}": d.consumption_kwh,
        "consumption_reason": d.consumption_reason,
        f"max_demand_{demand}": d.max_demand_kw,
        "max_demand_at": d.max_demand_at.isoformat() if d.max_demand_at else None,
        f"meter_max_demand_{demand}": d.meter_max_demand,
        "meter_max_demand_at": d.meter_max_demand_at.isoformat() if d.meter_max_demand_at else None,
        "expected_intervals": d.expected_intervals,
        "completeness_pct": round(100 * d.completeness, 3),
        "by_status": d.by_status,
        "by_quality": d.by_quality,
        "decimals": d.decimals,
    }


def determinants_json(by_energy: dict[str, Determinants]) -> dict[str, Any]:
    """Import at the top (as before), every energy the meter has under `energies`."""
    d = by_energy["import"]
    out = {"meter": d.meter, "start": d.start.isoformat(), "end": d.end.isoformat(), **energy_json(d)}
    for key in ("register_channel", "interval_channel", "unit", "decimals"):
        out.pop(key)
    return {**out, "energies": {name: energy_json(e) for name, e in by_energy.items()}}


def meter_readings_json(validations: list[Validation]) -> dict[str, Any]:
    """One meter's period shaped after IEC 61968-9 MeterReadings (IntervalBlocks, Readings):
    one block per energy the meter has (import first)."""
    v = validations[0]
    return {
        "Meter": {"mRID": v.meter},
        "valuesInterval": {"start": v.start.isoformat(), "end": v.end.isoformat()},
        "IntervalBlocks": [{
            "ReadingType": {"ref": READING_TYPES[e.energy.name], "channel": str(e.energy.interval), "unit": e.unit,
                            "intervalLength": int(e.step.total_seconds()), "energy": e.energy.name},
            "IntervalReadings": [{
                "timeStamp": i.t.isoformat(), "value": i.value, "status": i.status, "version": i.version,
                "estMethod": i.method if i.status == "estimated" else None,
                "ReadingQualities": [{"ref": q} for q in i.qualities],
                "validationRules": list(i.rules),
            } for i in e.intervals],
        } for e in validations],
        "Readings": [{
            "ReadingType": {"channel": str(e.energy.register), "unit": r.unit}, "timeStamp": r.timestamp.isoformat(),
            "value": r.value, "ReadingQualities": [{"ref": q} for q in r.qualities],
        } for e in validations for r in e.registers],
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
        energy: EnergyName = "import",
    ) -> dict[str, Any]:  # fmt: skip
        """Validated intervals of one energy (import by default), with status, qualities, rules and version."""
        period(start, end)
        v = await vee.validate(known(meter_id), start, end, ENERGIES[energy])
        page = v.intervals[offset : offset + limit]
        more = offset + limit < len(v.intervals)
        return {
            "meter": v.meter, "energy": energy, "channel": str(v.energy.interval), "unit": v.unit,
            "interval_s": int(v.step.total_seconds()), "start": v.start.isoformat(), "end": v.end.isoformat(),
            "total": len(v.intervals), "offset": offset, "limit": limit,
            "next_offset": offset + limit if more else None, "counts": v.counts(),
            "intervals": [interval_json(i) for i in page],
        }  # fmt: skip

    @router.get("/meters/{meter_id}/registers")
    async def registers(meter_id: str, start: Start, end: End, _who: Reader,
                        energy: EnergyName = "import") -> dict[str, Any]:  # fmt: skip
        """Energy register reads in the period, as read (version 0), with their qualities."""
        period(start, end)
        channel = ENERGIES[energy].register
        reads = await vee.store.query(known(meter_id), channel, start, end, kind="register")
        return {"meter": meter_id, "energy": energy, "channel": str(channel), "registers": [
            {"timestamp": r.timestamp.isoformat(), "value": r.value, "unit": r.unit, "qualities": list(r.qualities),
             "raw": r.raw, "multiplier": r.multiplier, "version": 0} for r in reads]}  # fmt: skip

    @router.get("/meters/{meter_id}/determinants")
    async def determinants(meter_id: str, start: Start, end: End, _who: Reader) -> dict[str, Any]:
        """Start/end register, consumption, max demand, completeness and counts by quality, of
        import (at the top) and of every energy the meter has (`energies`: export for a PV
        customer, reactive where the meter records it). No data: consumption null with the reason."""
        period(start, end)
        meter = known(meter_id)
        return determinants_json({e.name: await vee.determinants(meter, start, end, e)
                                  for e in await energies_of(meter, start, end)})  # fmt: skip

    async def energies_of(meter: str, start: datetime, end: datetime) -> list[Energy]:
        """Import always; the others where the meter gave any of them in the period."""
        found = [IMPORT]
        for e in ENERGIES.values():
            if e != IMPORT and any([await vee.store.query(meter, e.register, start, end),
                                    await vee.store.query(meter, e.interval, start, end)]):  # fmt: skip
                found.append(e)
        return found

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
            vs = [await vee.validate(meter_id, start, end, e) for e in await energies_of(meter_id, start, end)]
            yield (b"," if n else b"") + json.dumps(meter_readings_json(vs)).encode()
        yield b"]}"

    async def _csv_export(ids: list[str], start: datetime, end: datetime) -> AsyncIterator[bytes]:
        yield (",".join(CSV_COLUMNS) + "\n").encode()
        for meter_id in ids:
            out = io.StringIO()
            writer = csv.writer(out, lineterminator="\n")
            for e in await energies_of(meter_id, start, end):
                v = await vee.validate(meter_id, start, end, e)
                for i in v.intervals:
                    value = "" if i.value is None else repr(i.value)
                    writer.writerow([v.meter, str(e.interval), i.t.isoformat(), value, v.unit, i.status,
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
        found = await asyncio.to_thread(vee.versions.versions, known(meter_id), IMPORT.interval,
                                        timestamp - vee.cfg.interval, timestamp)  # fmt: skip
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
            await asyncio.to_thread(vee.versions.record_exchange, meter,
                                    Exchange(body.timestamp, body.baseline, body.multiplier), author=who.name,
                                    reason=body.reason)  # fmt: skip
        except DuplicateExchange as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
        return {"meter": meter, "timestamp": body.timestamp.isoformat(), "by": who.name}

    return router
