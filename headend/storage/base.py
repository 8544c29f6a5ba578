"""The ReadingStore interface every store implements and the contract tests check.

Query ranges follow the interval-ending convention: `start < timestamp <= end`, so the
period 00:00-24:00 holds the 96 quarter-hours stamped 00:15 ... 24:00.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import datetime

from headend.model import Obis, Reading, ReadingKind
from headend.storage.columns import Columns
from headend.storage.series import Series, readings_of


class StoreError(Exception):
    """Base of store errors."""


class StoreUnavailable(StoreError):
    """The store cannot be reached or is failing; try again later, nothing is lost."""


class StoreRejected(StoreError):
    """The store refused the data itself (HTTP 400 and the like); retrying the same batch won't help."""


class ReadingStore(ABC):
    """Where accepted readings end up. Writing the same identity twice keeps one point."""

    @abstractmethod
    async def write(self, batch: Sequence[Reading]) -> None:
        """Store every reading of the batch, or raise. Returning means the store confirmed it."""

    async def write_series(self, batch: Sequence[Series]) -> None:
        """`write` for readings in series; stores that can write columns directly do so."""
        await self.write(list(readings_of(batch)))

    @abstractmethod
    async def query(
        self,
        meter: str,
        channel: Obis,
        start: datetime,
        end: datetime,
        kind: ReadingKind = "interval",
    ) -> list[Reading]:
        """Readings with `start < timestamp <= end`, oldest first."""

    async def query_columns(self, meter: str, channel: Obis, start: datetime, end: datetime,
                            kind: ReadingKind = "interval") -> Columns:  # fmt: skip
        """`query` as columns (validation's input); stores that can answer without making
        readings first do so."""
        readings = await self.query(meter, channel, start, end, kind)
        return await asyncio.to_thread(Columns.of_readings, readings)

    @abstractmethod
    async def last_interval(self, meter: str, channel: Obis) -> datetime | None:
        """Timestamp of the newest stored interval of a channel, None if there is none."""

    @abstractmethod
    async def count(self, kind: ReadingKind = "interval") -> int:
        """Number of stored readings of a kind, all meters."""

    @abstractmethod
    async def latest_intervals(self, channels: Sequence[Obis]) -> dict[tuple[str, Obis], datetime]:
        """The newest stored interval of every meter for each of `channels`, in one request:
        what a process that starts knows is stored (meters with none are left out)."""

    @abstractmethod
    async def interval_times(self, meters: Sequence[str], channel: Obis, start: datetime,
                             end: datetime) -> dict[str, set[datetime]]:  # fmt: skip
        """Per meter of `meters`, the timestamps in (start, end] of the channel's intervals that
        have a value, in as few requests as the store allows (collection KPIs over a fleet)."""

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Prepare the store (create the database or tables)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    async def __aenter__(self) -> ReadingStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
