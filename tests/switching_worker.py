"""A head-end process for the switching crash test.

`run` journals and executes a disconnect of C-1 (Modbus unit 1 on --port); with --freeze it
stops dead right after the relay was operated and before the read-back: the worst moment to
be killed. `recover` runs the restart path and prints each recovered command's final state.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from headend.config import parse_config
from headend.model import RelayAction
from headend.protocols.modbus import ModbusLink, ModbusMeterSession
from headend.protocols.modbus_maps import shipped_maps
from headend.registry import Registry
from headend.switching.engine import SwitchingEngine
from headend.switching.journal import CommandJournal
from headend.switching.policy import SwitchingPolicy
from tests.test_switching import MONDAY_10


class FreezingSession(ModbusMeterSession):
    async def operate_relay(self, action: RelayAction) -> None:
        await super().operate_relay(action)
        print("OPERATED", flush=True)
        time.sleep(3600)  # noqa: ASYNC251 - freeze the whole process until killed


async def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["run", "recover"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--journal", required=True)
    p.add_argument("--freeze", action="store_true")
    args = p.parse_args(argv)
    cfg = parse_config({
        "links": [{"id": "bus", "kind": "tcp", "protocol": "modbus-tcp", "host": "127.0.0.1", "port": args.port}],
        "meters": [{"id": "C-1", "link": "bus", "address": 1, "map": "sim-relay-meter"}],
    })  # fmt: skip
    meter_map = shipped_maps()["sim-relay-meter"]
    link = ModbusLink.tcp("127.0.0.1", args.port, timeout=1)
    kind = FreezingSession if args.freeze else ModbusMeterSession

    def session(meter: str) -> Any:
        return kind(link, meter, 1, meter_map)

    engine = SwitchingEngine(
        CommandJournal(args.journal), SwitchingPolicy(cfg.switching), Registry(cfg), session,
        confirm_timeout=1, poll_interval=0.05, now=lambda: MONDAY_10,
    )  # fmt: skip
    if args.mode == "run":
        command = await engine.execute("C-1", RelayAction.DISCONNECT, who="op", why="arrears")
        print(json.dumps({"state": command.state.value}), flush=True)
    else:
        done = [await engine.reconfirm(c) for c in engine.recover()]
        print(json.dumps([{"state": c.state.value, "evidence": c.evidence} for c in done if c]), flush=True)
    link.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
