"""A meter channel's stored readings as columns: what validation works on, without a
Reading object per interval (a month with its like-day history is some 5,600 rows)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from headend.model import Reading
from headend.storage.codec import to_ns


@dataclass(frozen=True)
class Columns:
    ts: NDArray[np.int64]  # epoch ns, oldest first (equal stamps in the order they were given)
    value: NDArray[np.float64]  # NaN: the reading has no value
    multiplier: NDArray[np.float64]
    quality: NDArray[np.object_]  # the reading's quality codes joined by "," (str), as the stores keep them

    def __len__(self) -> int:
        return len(self.ts)

    @classmethod
    def empty(cls) -> Columns:
        return cls(np.empty(0, np.int64), np.empty(0), np.empty(0), np.empty(0, dtype=object))

    @classmethod
    def of_rows(cls, rows: Sequence[tuple[Any, ...]]) -> Columns:
        """From (ts ns, value or None, multiplier, quality text) rows in time order."""
        if not rows:
            return cls.empty()
        ts, value, multiplier, quality = zip(*rows, strict=True)
        values = np.array(value, dtype=np.float64)  # None becomes NaN
        return cls(np.array(ts, dtype=np.int64), values, np.array(multiplier, dtype=np.float64),
                   np.array(quality, dtype=object))

    @classmethod
    def of_readings(cls, readings: Sequence[Reading]) -> Columns:
        """From readings in any order; sorted by time, stably (of two readings for one
        interval, the one given last stays last: it is the one a store keeps)."""
        rows = [(to_ns(r.timestamp), r.value, r.multiplier, ",".join(r.qualities)) for r in readings]
        rows.sort(key=lambda row: row[0])
        return cls.of_rows(rows)
