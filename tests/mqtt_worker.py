"""A head-end process for the MQTT crash test: receives concentrator data into an outbox.

Prints CONNECTED once subscribed, ACCEPTED n after each durable accept. With --freeze it
prints RECEIVED and stops dead inside the first accept, before anything is committed or
acknowledged: the worst moment to be killed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Mapping, Sequence

from headend.protocols.mqtt import ConcentratorLink
from headend.storage.outbox import Outbox
from headend.storage.series import Series


class AnnouncingOutbox(Outbox):
    freeze = False
    accepted = 0

    async def accept_series(self, items: Sequence[Series], *, cursors: Mapping[str, int] | None = None) -> int:
        if self.freeze:
            print("RECEIVED", flush=True)
            time.sleep(3600)  # noqa: ASYNC251 - freeze the whole process, loop included, until killed
        n = await super().accept_series(items, cursors=cursors)
        self.accepted += n
        print(f"ACCEPTED {self.accepted}", flush=True)
        return n


async def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--headend-id", required=True)
    p.add_argument("--outbox", required=True)
    p.add_argument("--freeze", action="store_true")
    args = p.parse_args(argv)
    outbox = AnnouncingOutbox(args.outbox)
    outbox.freeze = args.freeze
    async with ConcentratorLink("127.0.0.1", args.port, outbox, headend_id=args.headend_id) as link:
        await link.connected.wait()
        print("CONNECTED", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
