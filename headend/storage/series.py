"""Series: the readings of one meter's channel in columns, the unit the data path moves.

A concentrator message or a profile read is hundreds of values of a few channels that share
everything but time, value and quality. Kept as one Series (one outbox row, one line-protocol
prefix, one check of meter, unit and source) instead of hundreds of Reading objects, the
data path costs a few microseconds per value instead of tens. `readings()` gives the Reading
objects back where one is needed (SQLite store, quarantine, tests).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import compress
from typing import Any

import msgspec

from headend.model import Obis, Reading, ReadingKind
from headend.storage.codec import from_ns, parse_obis, reading_from_dict, to_ns

#: First element of an encoded series (an outbox row written before series is a JSON object).
_TAG = "s1"
# msgspec: a seventh of the json module's time for the outbox's rows.
_encoder, _decoder = msgspec.json.Encoder(), msgspec.json.Decoder()


@dataclass(frozen=True, slots=True)
class Series:
    kind: ReadingKind
    meter: str
    channel: Obis
    unit: str
    source: str
    multiplier: float
    collected_ns: int
    #: Per point: interval end (epoch ns), value (None: a marked gap), raw value, scaler and
    #: the quality codes comma-joined ("" for none), as line protocol and SQLite keep them.
    times: list[int]
    values: list[float | None]
    raws: list[float | None]
    scalers: list[int]
    qualities: list[str]

    def __len__(self) -> int:
        return len(self.times)

    def readings(self) -> list[Reading]:
        """The Reading objects, not checked again: a series is built from checked values."""
        channel, collected = self.channel, from_ns(self.collected_ns)
        return [
            Reading.stored(kind=self.kind, meter=self.meter, channel=channel, timestamp=from_ns(t), value=v,
                           raw=raw, scaler=scaler, multiplier=self.multiplier, unit=self.unit,
                           qualities=tuple(q.split(",")) if q else (), source=self.source, collected_at=collected)
            for t, v, raw, scaler, q in zip(self.times, self.values, self.raws, self.scalers, self.qualities,
                                            strict=True)
        ]  # fmt: skip

    def split(self) -> tuple[Series, Series]:
        """Two halves (to isolate a point a store refuses)."""
        mid = len(self) // 2
        return self.part(slice(0, mid)), self.part(slice(mid, None))

    def part(self, which: slice) -> Series:
        return Series(self.kind, self.meter, self.channel, self.unit, self.source, self.multiplier,
                      self.collected_ns, self.times[which], self.values[which], self.raws[which],
                      self.scalers[which], self.qualities[which])  # fmt: skip

    def only(self, keep: Sequence[bool]) -> Series:
        return Series(self.kind, self.meter, self.channel, self.unit, self.source, self.multiplier,
                      self.collected_ns, list(compress(self.times, keep)), list(compress(self.values, keep)),
                      list(compress(self.raws, keep)), list(compress(self.scalers, keep)),
                      list(compress(self.qualities, keep)))  # fmt: skip

    def encode(self) -> str:
        """Compact JSON for the outbox; raws and scalers that are all default are left out.

        A value that is not finite (slipped past the checks) is refused here, before
        acceptance: JSON has no NaN, and the encoder would write it as null, a gap."""
        raws = None if self.raws.count(None) == len(self.raws) else self.raws
        scalers = None if self.scalers.count(0) == len(self.scalers) else self.scalers
        # filter(None, ...) leaves out None and 0.0, both fine.
        if not (all(map(math.isfinite, filter(None, self.values))) and math.isfinite(self.multiplier)
                and (raws is None or all(map(math.isfinite, filter(None, raws))))):  # fmt: skip
            raise ValueError(f"{self.meter} {self.channel}: a value that is not a finite number is not JSON compliant")
        doc = [_TAG, self.kind, self.meter, str(self.channel), self.unit, self.source, self.multiplier,
               self.collected_ns, self.times, self.values, raws, scalers, self.qualities]  # fmt: skip
        return _encoder.encode(doc).decode()


def decode(body: str) -> Series:
    """A series from an outbox row: this format, or a single reading as rows were once kept."""
    doc: Any = _decoder.decode(body)
    if isinstance(doc, dict):
        return of_readings([reading_from_dict(doc)])[0]
    tag, kind, meter, channel, unit, source, multiplier, collected, times, values, raws, scalers, qualities = doc
    if tag != _TAG:
        raise ValueError(f"not a series: {tag!r}")
    n = len(times)
    if not (len(values) == len(qualities) == n and (raws is None or len(raws) == n)
            and (scalers is None or len(scalers) == n)):  # fmt: skip
        raise ValueError("series columns of different lengths")
    return Series(kind, meter, parse_obis(channel), unit, source, float(multiplier), int(collected), times, values,
                  [None] * n if raws is None else raws, [0] * n if scalers is None else scalers, qualities)  # fmt: skip


def of_readings(readings: Iterable[Reading]) -> list[Series]:
    """Readings grouped into series (each reading's order kept within its series)."""
    groups: dict[tuple[Any, ...], list[Reading]] = {}
    for r in readings:
        groups.setdefault((r.kind, r.meter, r.channel, r.unit, r.source, r.multiplier, r.collected_at), []).append(r)
    return [
        Series(kind, meter, channel, unit, source, multiplier, to_ns(collected), [to_ns(r.timestamp) for r in rs],
               [r.value for r in rs], [r.raw for r in rs], [r.scaler for r in rs], [",".join(r.qualities) for r in rs])
        for (kind, meter, channel, unit, source, multiplier, collected), rs in groups.items()
    ]  # fmt: skip


def readings_of(series: Iterable[Series]) -> Iterator[Reading]:
    for s in series:
        yield from s.readings()


def count(series: Iterable[Series]) -> int:
    return sum(len(s) for s in series)
