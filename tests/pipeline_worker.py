"""A head-end storage process for the crash tests: accepts readings and writes them to InfluxDB.

Prints `ACCEPTED n` after each durable accept (n = readings accepted so far), `STORED k`
after the store confirmed batch k, and `DRAINED` when the outbox is empty and no more
readings are to come. With --freeze-after-batch K it stops dead right after the store
confirmed batch K and before the outbox deletes it: the worst moment to be killed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence

from headend.storage.influx import InfluxStore
from headend.storage.outbox import Outbox
from headend.storage.series import Series
from headend.storage.writer import BatchWriter
from tests.factories import intervals


class AnnouncingStore(InfluxStore):
    def __init__(self, *args: object, freeze_after: int | None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.batches = 0
        self.freeze_after = freeze_after

    async def write_series(self, batch: Sequence[Series]) -> None:
        await super().write_series(batch)
        self.batches += 1
        print(f"STORED {self.batches}", flush=True)
        if self.batches == self.freeze_after:
            time.sleep(3600)  # noqa: ASYNC251 - freeze the whole process, loop included, until killed


async def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--outbox", required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--db", required=True)
    p.add_argument("--meters", type=int, default=0)
    p.add_argument("--intervals", type=int, default=0)
    p.add_argument("--chunk", type=int, default=1000)
    p.add_argument("--batch", type=int, default=2000)
    p.add_argument("--freeze-after-batch", type=int)
    args = p.parse_args(argv)

    outbox = Outbox(args.outbox)
    outbox.lock_for_writer()
    store = AnnouncingStore(args.url, args.db, freeze_after=args.freeze_after_batch)
    await store.open()
    writer = BatchWriter(outbox, store, batch_size=args.batch, max_backoff=0.5, poll_interval=0.2)
    task = asyncio.create_task(writer.run())
    accepted = 0
    for start in range(0, args.intervals, args.chunk):
        for meter in range(1, args.meters + 1):
            accepted += await outbox.accept(list(intervals(meter, start, min(start + args.chunk, args.intervals))))
            print(f"ACCEPTED {accepted}", flush=True)
            await asyncio.sleep(0)  # let the writer interleave
    await writer.wait_drained()
    print("DRAINED", flush=True)
    writer.stop()
    await task
    await store.close()
    outbox.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
