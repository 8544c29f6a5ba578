"""Series: the readings of one meter's channel in columns, the unit the data path moves.

A concentrator message or a profile read is hundreds of values of a few channels that share
everything but time, value and quality. Kept as one Series (one outbox row, one line-protocol
prefix, one check of meter, unit and source) instead of hundreds of Reading objects, the
data path costs a few microseconds per value instead of tens. `readings()` gives the Reading
objects back where one is needed (SQLite store, quarantine, tests).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import msgspec

from headend.model import Obis, Reading, ReadingKind, parse_obis
from headend.storage.codec import from_ns, reading_from_dict, to_ns

#: First element of an encoded series (an outbox row written before series is a JSON object).
_TAG = "s1"
#: An encoded series, typed: a row that decodes but holds something else (damaged, written by
#: something else) is refused here and quarantined, never handed to a store.
_Encoded = tuple[
    Literal["s1"], Literal["interval", "register", "event"], str, str, str, str, float,
    list[int] | int, list[int], list[float | None], list[float | None] | None, list[int] | None, list[str],
]  # fmt: skip
# msgspec: a seventh of the json module's time for the outbox's rows.
_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_Encoded | dict[str, Any])


@dataclass(frozen=True, slots=True)
class Series:
    kind: ReadingKind
    meter: str
    channel: Obis
    unit: str
    source: str
    multiplier: float
    #: Per point: interval end (epoch ns), value (None: a marked gap), raw value, scaler, the
    #: quality codes comma-joined ("" for none), as line protocol and SQLite keep them, and
    #: when the head-end collected it (epoch ns).
    times: list[int]
    values: list[float | None]
    raws: list[float | None]
    scalers: list[int]
    qualities: list[str]
    collected: list[int]

    def __len__(self) -> int:
        return len(self.times)

    def readings(self) -> list[Reading]:
        """The Reading objects, not checked again: a series is built from checked values."""
        return [
            Reading.stored(kind=self.kind, meter=self.meter, channel=self.channel, timestamp=from_ns(t), value=v,
                           raw=raw, scaler=scaler, multiplier=self.multiplier, unit=self.unit,
                           qualities=tuple(q.split(",")) if q else (), source=self.source, collected_at=from_ns(c))
            for t, v, raw, scaler, q, c in zip(self.times, self.values, self.raws, self.scalers, self.qualities,
                                               self.collected, strict=True)
        ]  # fmt: skip

    def split(self) -> tuple[Series, Series]:
        """Two halves (to isolate a point a store refuses)."""
        mid = len(self) // 2
        return self._part(slice(None, mid)), self._part(slice(mid, None))

    def _part(self, which: slice) -> Series:
        return Series(self.kind, self.meter, self.channel, self.unit, self.source, self.multiplier,
                      self.times[which], self.values[which], self.raws[which], self.scalers[which],
                      self.qualities[which], self.collected[which])  # fmt: skip

    def encode(self) -> str:
        """Compact JSON for the outbox; raws and scalers that are all default, and one
        collection time for all, are written once.

        A value that is not finite (slipped past the checks) is refused here, before
        acceptance: JSON has no NaN, and the encoder would write it as null, a gap."""
        n = len(self)
        raws = None if self.raws.count(None) == n else self.raws
        scalers = None if self.scalers.count(0) == n else self.scalers
        collected: list[int] | int = self.collected[0] if n and self.collected.count(self.collected[0]) == n \
            else self.collected  # fmt: skip
        # filter(None, ...) leaves out None and 0.0, both fine.
        if not (all(map(math.isfinite, filter(None, self.values))) and math.isfinite(self.multiplier)
                and (raws is None or all(map(math.isfinite, filter(None, raws))))):  # fmt: skip
            raise ValueError(f"{self.meter} {self.channel}: a value that is not a finite number is not JSON compliant")
        doc = [_TAG, self.kind, self.meter, str(self.channel), self.unit, self.source, self.multiplier,
               collected, self.times, self.values, raws, scalers, self.qualities]  # fmt: skip
        return _encoder.encode(doc).decode()


def decode(body: str) -> Series:
    """A series from an outbox row: this format, or a single reading as rows were once kept.
    Raises (msgspec.ValidationError, ValueError, KeyError) for anything else."""
    doc = _decoder.decode(body)
    if isinstance(doc, dict):
        return of_readings([reading_from_dict(doc)])[0]
    _, kind, meter, channel, unit, source, multiplier, collected, times, values, raws, scalers, qualities = doc
    n = len(times)
    if not (len(values) == len(qualities) == n and (raws is None or len(raws) == n)
            and (scalers is None or len(scalers) == n)
            and (isinstance(collected, int) or len(collected) == n)):  # fmt: skip
        raise ValueError("series columns of different lengths")
    return Series(kind, meter, parse_obis(channel), unit, source, multiplier, times, values,
                  [None] * n if raws is None else raws, [0] * n if scalers is None else scalers, qualities,
                  [collected] * n if isinstance(collected, int) else collected)  # fmt: skip


def of_readings(readings: Iterable[Reading]) -> list[Series]:
    """Readings grouped into series per meter and channel, in their order: a reading whose
    unit, source or multiplier differs from the one before of its channel starts a new series
    after it, so one written twice is stored as given last."""
    groups: list[list[Reading]] = []
    open_: dict[tuple[Any, ...], list[Reading]] = {}
    for r in readings:
        group = open_.get((r.kind, r.meter, r.channel))
        if group is None or (group[0].unit, group[0].source, group[0].multiplier) != (r.unit, r.source, r.multiplier):
            group = open_[(r.kind, r.meter, r.channel)] = []
            groups.append(group)
        group.append(r)
    # A profile's channels share their times (and a read its collection time): each datetime
    # is converted once.
    ns: dict[datetime, int] = {}

    def at(t: datetime) -> int:
        n = ns.get(t)
        if n is None:
            n = ns[t] = to_ns(t)
        return n

    return [
        Series(rs[0].kind, rs[0].meter, rs[0].channel, rs[0].unit, rs[0].source, rs[0].multiplier,
               [at(r.timestamp) for r in rs], [r.value for r in rs], [r.raw for r in rs], [r.scaler for r in rs],
               [",".join(r.qualities) if r.qualities else "" for r in rs], [at(r.collected_at) for r in rs])
        for rs in groups
    ]  # fmt: skip


def readings_of(series: Iterable[Series]) -> Iterator[Reading]:
    for s in series:
        yield from s.readings()


def count(series: Iterable[Series]) -> int:
    return sum(len(s) for s in series)
