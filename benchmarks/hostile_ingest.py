"""How `headend serve` answers while a rogue client floods its broker with data that must be
refused: /health latency (p50, p99) during the flood against the same figure with the broker
quiet (the limit, measured in the same run), the head-end's RSS before and after, and what it
kept of the flood (nothing but the quarantine).

The rogue publishes `--messages` data messages for a configured concentrator, each with a
seq of 10^9 + n (far past `max_seq_gap`): the first wave's head-end grew by ~600 MB and
stalled /health for seconds on one such message.

    python benchmarks/hostile_ingest.py [--messages 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import aiomqtt
import httpx
from serving import start_serve, until_healthy

from headend.api.auth import TokenStore
from headend.localservers import MosquittoServer, free_port
from headend.protocols.mqtt_schema import data_topic, state_topic


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def health_latencies(client: httpx.AsyncClient, seconds: float) -> list[float]:
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        began = time.perf_counter()
        r = await client.get("/health")
        out.append(time.perf_counter() - began)
        assert r.status_code == 200
        await asyncio.sleep(0.01)  # a probe every 10 ms, as a load balancer's health check would
    return out


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=2000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp, MosquittoServer(Path(tmp) / "broker") as broker:
        d = Path(tmp)
        dc = f"dc-{uuid.uuid4().hex[:6]}"
        api = free_port()
        TokenStore.issue(d / "tokens.toml", "bench", frozenset({"read-only"}))
        (d / "site.toml").write_text(f"""state_dir = "{d / "state"}"
[storage]
backend = "sqlite"
outbox = "{d / "outbox.sqlite"}"
[storage.sqlite]
path = "{d / "readings.sqlite"}"
[api]
port = {api}
tokens_file = "{d / "tokens.toml"}"
[[links]]
id = "broker"
kind = "mqtt"
host = "127.0.0.1"
port = {broker.port}
[[concentrators]]
id = "{dc}"
link = "broker"
[[meters]]
id = "M1"
concentrator = "{dc}"
""")
        proc = await start_serve(d / "site.toml", log=d / "serve.log")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api}", timeout=30) as client:
            await until_healthy(client, proc, d / "serve.log")
            async with aiomqtt.Client("127.0.0.1", broker.port, identifier=f"rogue-{dc}") as rogue:
                birth = {"status": "online", "bdseq": 1, "seq": 0, "meters": [{"id": "M1"}]}
                await rogue.publish(state_topic(dc), json.dumps(birth), qos=1, retain=True)
                await asyncio.sleep(1)  # the birth is in
                quiet = await health_latencies(client, 5)
                rss_before = rss_mib(proc.pid)
                block = {"meter": "M1", "kind": "interval", "channel": "1-0:1.29.0.255",
                         "readings": [{"t": "2026-03-09T10:15:00Z", "v": 666}]}  # fmt: skip

                async def flood() -> None:
                    for n in range(args.messages):
                        await rogue.publish(data_topic(dc), json.dumps({"seq": 10**9 + n, "blocks": [block]}), qos=1)

                flooding = asyncio.create_task(flood())
                loud = await health_latencies(client, 5)
                await flooding
                await asyncio.sleep(2)
                rss_after = rss_mib(proc.pid)
        proc.terminate()
        await proc.wait()
    print(f"{platform.python_implementation()} {platform.python_version()}; headend serve, one rogue publishing "
          f"{args.messages} data messages with seq 10^9+n for a configured concentrator")  # fmt: skip
    print(f"  limit (same run, broker quiet): /health p50 {statistics.median(quiet) * 1000:.1f} ms, "
          f"p99 {p99(quiet) * 1000:.1f} ms ({len(quiet)} probes)")  # fmt: skip
    print(f"  during the flood: /health p50 {statistics.median(loud) * 1000:.1f} ms, p99 {p99(loud) * 1000:.1f} ms "
          f"({len(loud)} probes; {p99(loud) / p99(quiet):.1f}x); target p99 < 100 ms: "
          f"{'met' if p99(loud) < 0.1 else 'NOT met'}")  # fmt: skip
    print(f"  head-end RSS {rss_before:.0f} MiB before, {rss_after:.0f} MiB after (+{rss_after - rss_before:.1f})")


if __name__ == "__main__":
    asyncio.run(main())
