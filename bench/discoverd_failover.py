"""discoverd's failure timings: the figures its tests only bound by generous deadlines (a test
that asserted them would fail on a busy machine), measured and set against what etcd promises.

* **expiry**: instances registered through node 1's API with a TTL of `--ttl` seconds and
  never heartbeaten; from each registration's reply to its `down` event at a `Client` watcher
  on node 3, and that over the TTL (etcd looks for expired leases about every 500 ms);
* **fail-over**: on a 3-member etcd cluster with a discoverd API and DNS server per member,
  each talking to its own member first, the etcd leader is SIGKILLed; from the kill, the time
  until a meta compare-and-swap through one surviving node succeeds, until an instance list
  through the other one answers, and until an instance registered then is in a survivor's DNS;
  each over etcd's election timeout (500 ms, `EtcdProcess`). The killed member is restarted
  from its data and rejoins before the next round.

    python bench/discoverd_failover.py [--rounds 5] [--ttl 2] [--json]

It prints, and asserts nothing. It needs `etcd` on the PATH (no root), and about 10 s per
round. At the end, also on Ctrl-C or SIGTERM, the APIs and DNS servers are closed, the members
stopped and the temp dir removed; it exits 1 if an etcd of this run is left.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "plugins" / "discoverd"))

import aiohttp  # noqa: E402
from discoverd import on_etcd_cluster  # noqa: E402  (bench/discoverd.py)
from dnslib import QTYPE, DNSRecord  # noqa: E402
from flynn_discoverd.client import Client  # noqa: E402
from flynn_discoverd.dns import DNSServer  # noqa: E402
from flynn_discoverd.etcd import EtcdClient, EtcdProcess  # noqa: E402
from flynn_discoverd.server import serve  # noqa: E402
from flynn_discoverd.store import Store  # noqa: E402
from flynn_discoverd.types import CURRENT, DOWN, instance_id  # noqa: E402
from stats import summary  # noqa: E402

from flynn_host.dev.host import free_ports  # noqa: E402

ELECTION_TIMEOUT = 0.5  # EtcdProcess's --election-timeout
GIVE_UP = 60.0  # a step that takes longer than this is reported as an error


class Node:
    """One discoverd node: a store on its member first, its API and its DNS server."""

    def __init__(self, store: Store, url: str, dns: DNSServer) -> None:
        self.store, self.url, self.dns = store, url, dns


async def start_nodes(
    members: list[EtcdProcess], ttl: float, stack: contextlib.AsyncExitStack
) -> list[Node]:
    urls = [m.client_url for m in members]
    nodes = []
    for i, port in enumerate(free_ports(len(members))):
        store = Store(EtcdClient(urls[i:] + urls[:i]), prefix="/bench-failover", ttl=ttl)
        stack.push_async_callback(store.close)
        runner = await serve(store, "127.0.0.1", port)
        stack.push_async_callback(runner.cleanup)
        dns = DNSServer(store, [])
        await dns.start("127.0.0.1", 0)
        stack.push_async_callback(dns.stop)
        nodes.append(Node(store, f"http://127.0.0.1:{port}", dns))
    return nodes


async def call(http: aiohttp.ClientSession, method: str, url: str, body: Any = None) -> Any:
    async with http.request(method, url, json=body, timeout=aiohttp.ClientTimeout(5)) as resp:
        data = await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{method} {url}: HTTP {resp.status}: {data.decode()[:200]}")
        return json.loads(data) if data.strip() else None


async def until_ok(http: aiohttp.ClientSession, method: str, url: str, body: Any = None) -> Any:
    """Retry (every 10 ms) until the call succeeds."""
    async with asyncio.timeout(GIVE_UP):
        while True:
            with contextlib.suppress(RuntimeError, aiohttp.ClientError, TimeoutError):
                return await call(http, method, url, body)
            await asyncio.sleep(0.01)


def instance(n: int) -> dict[str, Any]:
    addr = f"10.77.{n >> 8 & 255}.{n & 255}:8080"
    return {"id": instance_id("tcp", addr), "addr": addr, "proto": "tcp", "meta": {}}


def dns_ips(port: int, name: str) -> set[str]:
    try:
        reply = DNSRecord.question(name).send("127.0.0.1", port, tcp=True, timeout=1)
    except OSError:
        return set()
    return {str(rr.rdata) for rr in DNSRecord.parse(reply).rr if rr.rtype == QTYPE.A}


# --- expiry -----------------------------------------------------------------------------------


async def expiry(http: aiohttp.ClientSession, nodes: list[Node], rounds: int) -> list[float]:
    """Registration reply → `down` at a watcher on node 3, for `rounds` silent instances
    registered 0.3 s apart (so they expire at different points of etcd's lease check)."""
    await call(http, "PUT", f"{nodes[0].url}/services/expiry", {})
    downs: dict[str, asyncio.Future[float]] = {}
    loop = asyncio.get_running_loop()
    async with Client([nodes[2].url]) as client:
        it = client.watch("expiry", kinds=(DOWN, CURRENT))
        async with asyncio.timeout(GIVE_UP):
            await anext(it)  # current: the watch is established

        async def collect() -> None:
            async for ev in it:
                fut = downs.get(ev.instance.id if ev.instance else "")
                if fut is not None and not fut.done():
                    fut.set_result(time.perf_counter())

        collector = asyncio.create_task(collect())
        try:
            registered = {}
            for n in range(rounds):
                inst = instance(n)
                downs[inst["id"]] = loop.create_future()
                await call(http, "PUT", f"{nodes[0].url}/services/expiry/instances/{inst['id']}",
                           inst)  # fmt: skip
                registered[inst["id"]] = time.perf_counter()
                await asyncio.sleep(0.3)
            async with asyncio.timeout(GIVE_UP):
                return [await downs[i] - t for i, t in registered.items()]
        finally:
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector


# --- fail-over --------------------------------------------------------------------------------


async def leader_index(etcd: EtcdClient, members: list[EtcdProcess]) -> int:
    async with asyncio.timeout(GIVE_UP):
        while True:
            leader = await etcd.leader_id()
            names = {str(m.get("ID")): m.get("name") for m in await etcd.member_list()}
            name = names.get(leader or "")
            if name:
                return [m.name for m in members].index(name)
            await asyncio.sleep(0.05)


async def failover_round(
    http: aiohttp.ClientSession, members: list[EtcdProcess], nodes: list[Node], n: int
) -> dict[str, float]:
    etcd = EtcdClient([m.client_url for m in members])
    try:
        dead = await leader_index(etcd, members)
    finally:
        await etcd.close()
    alive = [nodes[i] for i in range(len(nodes)) if i != dead]
    meta = await until_ok(http, "GET", f"{alive[0].url}/services/failover/meta")
    inst = instance(1000 + n)
    ip = inst["addr"].split(":")[0]

    async def write() -> float:
        body = {"data": n, "index": meta["index"]}
        await until_ok(http, "PUT", f"{alive[0].url}/services/failover/meta", body)
        return time.perf_counter()

    async def read() -> float:
        await until_ok(http, "GET", f"{alive[1].url}/services/failover/instances")
        return time.perf_counter()

    async def dns() -> float:
        path = f"/services/failover/instances/{inst['id']}"
        await until_ok(http, "PUT", alive[1].url + path, inst)
        async with asyncio.timeout(GIVE_UP):
            while True:
                if ip in await asyncio.to_thread(dns_ips, alive[0].dns.port, "failover.discoverd"):
                    break
                await asyncio.sleep(0.01)
        await call(http, "DELETE", alive[1].url + path)
        return time.perf_counter()

    killed = time.perf_counter()
    members[dead].kill()
    done = await asyncio.gather(write(), read(), dns())
    members[dead].start()
    await members[dead].wait_healthy_async(GIVE_UP)
    return dict(zip(("write", "read", "dns"), (t - killed for t in done), strict=True))


async def run_bench(members: list[EtcdProcess], rounds: int, ttl: float) -> dict[str, Any]:
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    async with contextlib.AsyncExitStack() as stack:
        http = aiohttp.ClientSession()
        stack.push_async_callback(http.close)
        nodes = await start_nodes(members, ttl, stack)
        expired = await expiry(http, nodes, rounds)
        await call(http, "PUT", f"{nodes[0].url}/services/failover", {})
        await call(http, "PUT", f"{nodes[0].url}/services/failover/meta", {"data": 0, "index": 0})
        failovers = []
        for n in range(rounds):
            failovers.append(await failover_round(http, members, nodes, n))
            print(f"\r  fail-over {n + 1}/{rounds}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
    raw = {"expiry": expired, **{k: [f[k] for f in failovers] for k in ("write", "read", "dns")}}
    reference = {"expiry": ttl, "write": ELECTION_TIMEOUT, "read": ELECTION_TIMEOUT,
                 "dns": ELECTION_TIMEOUT}  # fmt: skip
    return {
        "rounds": rounds,
        "ttl_s": ttl,
        "election_timeout_s": ELECTION_TIMEOUT,
        "ms": {k: summary(v) for k, v in raw.items()},
        "ratio_median": {k: round(statistics.median(v) / reference[k], 2) for k, v in raw.items()},
        "ratio_max": {k: round(max(v) / reference[k], 2) for k, v in raw.items()},
        "samples_ms": {k: [round(x * 1000, 1) for x in v] for k, v in raw.items()},
    }


ROWS = [
    ("expiry", "silent instance: registered → down", "TTL"),
    ("write", "leader killed → meta CAS succeeds", "election timeout"),
    ("read", "leader killed → instance list answers", "election timeout"),
    ("dns", "leader killed → new instance in DNS", "election timeout"),
]


def print_table(result: dict[str, Any]) -> None:
    print(f"discoverd failure timings, 3-member etcd cluster on loopback, {result['rounds']} "
          f"rounds (TTL {result['ttl_s']:g} s, election timeout "
          f"{result['election_timeout_s']:g} s)")  # fmt: skip
    print(f"{'':42}{'median':>9}{'max':>9}{'med/ref':>9}{'max/ref':>9}  ms, ratio to")
    for key, label, ref in ROWS:
        s = result["ms"][key]
        print(f"{label:42}{s['median']:9.0f}{s['max']:9.0f}{result['ratio_median'][key]:8.2f}×"
              f"{result['ratio_max'][key]:8.2f}×  {ref}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="expiries and fail-overs measured")
    p.add_argument("--ttl", type=float, default=2.0, help="the instances' TTL in seconds")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.ttl < 1:
        p.error("--rounds and --ttl must be at least 1")
    if shutil.which("etcd") is None:
        print("error: etcd is not on PATH", file=sys.stderr)
        return 1

    code, result = on_etcd_cluster(
        "bench-failover-", lambda members: run_bench(members, args.rounds, args.ttl)
    )
    if result is not None:
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print_table(result)
    return code


if __name__ == "__main__":
    sys.exit(main())
