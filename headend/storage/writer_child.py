"""The outbox writer as a process of its own, started by `headend serve` (WriterProcess).

Serve's event loop reads meters and concentrators and commits what they send to the outbox;
this process drains the outbox into the store (taking batches, formatting them, posting,
deleting), so the second core does that half. The outbox's commits make the hand-over
durable: nothing passes between the two processes but wake-ups and figures.

With serve, over pipes:
- stdin: first the job (a pickled WriterJob after its length, 4 bytes big-endian), then a
  byte whenever serve has accepted readings. End of file: serve stopped or died; this
  process ends at once. What it had in flight stays in the outbox (rows are deleted only
  after the store confirmed them) and the next writer writes it again; the store keeps one
  point per meter, channel and time, so nothing is doubled.
- stdout: one JSON object per line: {"stats": {...}} after each batch and when the figures
  change, {"drained": true} when it found the outbox empty, {"days": {meter: [midnight ns,
  ...]}} for what each batch stored, a few hundred meters a line (serve validates those
  meter-days once they close).
- stderr: its log, beside serve's.

The outbox's writer lock is serve's, inherited: while this process lives the outbox has its
one writer, and no second serve can start on it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import pickle
import struct
import sys
import threading
from collections.abc import Sequence
from typing import Any, BinaryIO

from headend.storage.base import StoreUnavailable
from headend.storage.outbox import Outbox
from headend.storage.pipeline import build_store
from headend.storage.series import Series
from headend.storage.writer import BatchWriter
from headend.storage.writer_process import WriterJob
from headend.vee.arrival import ConflictCheck, touched_days
from headend.vee.store import VeeStore

log = logging.getLogger(__name__)

#: How often changed figures are sent to serve (its /metrics is asked every few seconds).
STATS_EVERY = 0.1


def _receive_job(stdin: BinaryIO) -> WriterJob:
    size = struct.unpack(">I", stdin.read(4))[0]
    # From serve, our parent, over a pipe only it holds: not input from outside.
    job = pickle.loads(stdin.read(size))
    if not isinstance(job, WriterJob):
        raise TypeError(f"expected a WriterJob, got {type(job).__name__}")
    return job


#: Meters per "days" line: a batch of 100,000 meters with long unicode ids is many short
#: lines, never one serve would refuse.
DAYS_PER_LINE = 500


class _Report:
    """JSON lines to serve. Written from the event loop only."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out

    def send(self, message: dict[str, Any]) -> None:
        self.out.write(json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode() + b"\n")
        self.out.flush()


def _listen(stdin: BinaryIO, loop: asyncio.AbstractEventLoop, outbox: Outbox) -> None:
    """In a thread of its own, so it ends the process even while the loop is busy."""
    fd = stdin.fileno()
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if not data:
            # Serve is gone or stopping: end now, without waiting for anything in flight.
            os._exit(0)
        loop.call_soon_threadsafe(outbox.notify_new_data)


async def _run(job: WriterJob, stdin: BinaryIO, stdout: BinaryIO) -> None:
    report = _Report(stdout)
    storage = job.storage
    outbox = Outbox(storage.outbox)
    store = build_store(storage)
    check = ConflictCheck(store, VeeStore(job.vee_versions)) if job.vee_versions is not None else None

    def figures() -> dict[str, Any]:
        return {**dataclasses.asdict(writer.stats), "conflicts": check.conflicts if check is not None else 0}

    async def stored(batch: Sequence[Series]) -> None:
        report.send({"stats": figures()})  # each batch's counts at once, not at the next tick
        days = list(touched_days(batch).items())
        for first in range(0, len(days), DAYS_PER_LINE):
            report.send({"days": {meter: sorted(d) for meter, d in days[first : first + DAYS_PER_LINE]}})

    writer = BatchWriter(
        outbox,
        store,
        batch_size=storage.writer.batch_size,
        max_backoff=storage.writer.max_backoff.total_seconds(),
        warn_depth=storage.writer.warn_depth,
        linger=storage.writer.linger.total_seconds(),
        in_flight=storage.writer.in_flight,
        before_write=check.before_write if check is not None else None,
        after_write=stored,
        on_drained=lambda: report.send({"drained": True}),
    )
    threading.Thread(target=_listen, args=(stdin, asyncio.get_running_loop(), outbox), daemon=True).start()
    try:
        await store.open()
    except StoreUnavailable as exc:
        log.warning("store not reachable at start (%s); readings wait in the outbox until it is", exc)
    task = asyncio.create_task(writer.run(), name="outbox-writer")
    last: dict[str, Any] = {}
    while not task.done():
        now = figures()
        if now != last:  # health and failures between batches (the store down, backing off)
            report.send({"stats": now})
            last = now
        await asyncio.wait([task], timeout=STATS_EVERY)
    task.result()  # a writer that ended by itself did so with an error: let it show


def main() -> None:
    """Serve starts this with SIGINT and SIGTERM ignored from the first line (WriterProcess):
    it ends when serve closes its pipe, after serve has let it drain the outbox."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    job = _receive_job(stdin)
    logging.basicConfig(level=job.log_level,
                        format="%(asctime)s %(levelname)s writer[%(process)d] %(name)s: %(message)s")  # fmt: skip
    asyncio.run(_run(job, stdin, stdout))


if __name__ == "__main__":
    main()
