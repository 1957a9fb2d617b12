"""discoverd: registration → visible in a watcher on another node and in DNS, and event fan-out
to 50 watchers, next to etcd's own put latency measured on the same cluster in the same run.

Starts a 3-member etcd cluster on 127.0.0.1 (free ports, data under a temp dir), one discoverd
API (`Store` + `serve`) per member, each talking to its own member first, and a `DNSServer` on
node 2 (no recursors). Then, in rounds (so machine-load drift hits every measurement alike):

* **etcd put**: `EtcdClient.put` of a small key through member 1, one round trip (the reference);
* **watch**: a `Client` on node 3 watches service `watch` over SSE; an instance is registered
  through node 1's API (`PUT /services/watch/instances/<id>`); time until its `up` event arrives;
* **dns**: an instance with its own IP is registered through node 1 in a fresh service; from the
  moment the PUT is sent, node 2's DNS is asked for `<svc>.discoverd` A over UDP (dnslib),
  again ~1 ms after each answer, until the IP appears;
* **fan-out**: 50 `Client` watchers of service `fanout`, spread over the three nodes; one
  instance is registered through node 1; time until the last watcher has its `up` event (and
  each watcher's own latency).

Each instance is deregistered (and its `down` event awaited) before the next round. Everything
runs in this one process and event loop, as discoverd and its clients would share a small host.

    python bench/discoverd.py [--samples 100] [--json]

At the end, also on Ctrl-C or SIGTERM, the watchers, APIs and DNS server are closed, the etcd
members stopped and the temp dir removed; it then checks that no etcd process of this run is
left and exits 1 if one is.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "plugins" / "discoverd"))

import aiohttp  # noqa: E402
from dnslib import QTYPE, DNSRecord  # noqa: E402
from flynn_discoverd.client import Client  # noqa: E402
from flynn_discoverd.dns import DNSServer  # noqa: E402
from flynn_discoverd.etcd import EtcdClient, EtcdError, EtcdProcess  # noqa: E402
from flynn_discoverd.server import serve  # noqa: E402
from flynn_discoverd.store import Store  # noqa: E402
from flynn_discoverd.types import CURRENT, DOWN, UP, instance_id  # noqa: E402
from stats import summary  # noqa: E402

from flynn_host.dev.host import free_ports  # noqa: E402

WARMUP = 3
FANOUT_WATCHERS = 50
EVENT_TIMEOUT = 10.0
DNS_POLL = 0.001  # pause between DNS answers while polling
DNS_TIMEOUT = 0.5  # resend a UDP query after this long without an answer

ROWS = [
    ("etcd_put", "etcd put (reference)"),
    ("register", "register: PUT round trip via node 1"),
    ("watch", "register → up in watcher, other node"),
    ("dns", "register → in DNS, other node"),
    ("fanout_last", f"fan-out: register → all {FANOUT_WATCHERS} watchers"),
    ("fanout_each", "fan-out: register → each watcher"),
]


# --- the cluster ------------------------------------------------------------------------------


def make_members(base: Path) -> list[EtcdProcess]:
    """Three members of one new cluster on 127.0.0.1, as the tests' `etcd_cluster` fixture."""
    ports = free_ports(6)
    names = ["n1", "n2", "n3"]
    peers = {n: f"http://127.0.0.1:{ports[2 * i + 1]}" for i, n in enumerate(names)}
    token = f"bench-{uuid.uuid4().hex[:8]}"
    return [
        EtcdProcess(
            n,
            base / n,
            client_port=ports[2 * i],
            peer_port=ports[2 * i + 1],
            initial_cluster=peers,
            cluster_token=token,
        )  # fmt: skip
        for i, n in enumerate(names)
    ]


def etcd_left(base: Path) -> list[int]:
    """Pids of etcd processes whose command line names this run's temp dir."""
    left = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        is_etcd = Path(cmdline[0].decode(errors="replace")).name == "etcd"
        if is_etcd and any(str(base).encode() in arg for arg in cmdline):
            left.append(int(entry.name))
    return left


class Watcher:
    """A `Client.watch` of one service on one node, read by a task; `expect(kind, id)` returns
    a future that gets the `perf_counter` time that event arrived."""

    def __init__(self, url: str, service: str) -> None:
        self.client = Client([url])
        self.service = service
        self.ready = asyncio.Event()  # the `current` event: the watch is established
        self.waiting: dict[tuple[str, str], asyncio.Future[float]] = {}
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for ev in self.client.watch(self.service, kinds=(UP, DOWN, CURRENT)):
            if ev.kind == CURRENT:
                self.ready.set()
            elif ev.instance is not None:
                fut = self.waiting.pop((ev.kind, ev.instance.id), None)
                if fut is not None and not fut.done():
                    fut.set_result(time.perf_counter())

    def expect(self, kind: str, inst_id: str) -> asyncio.Future[float]:
        fut = asyncio.get_running_loop().create_future()
        self.waiting[(kind, inst_id)] = fut
        return fut

    async def wait_ready(self) -> None:
        ready = asyncio.create_task(self.ready.wait())
        done, _ = await asyncio.wait(
            {ready, self.task}, timeout=EVENT_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        if self.task in done:
            self.task.result()  # raises what ended the watch
        if ready not in done:
            ready.cancel()
            raise RuntimeError(f"watch of {self.service}: no `current` event")

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task
        await self.client.close()


class _Replies(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.replies.put_nowait(data)


class DNSProbe:
    """Asks one DNS server over UDP from one socket, one query at a time."""

    def __init__(self, transport: asyncio.DatagramTransport, proto: _Replies) -> None:
        self.transport = transport
        self.proto = proto

    @classmethod
    async def open(cls, host: str, port: int) -> DNSProbe:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(_Replies, remote_addr=(host, port))
        return cls(transport, proto)

    async def a_records(self, name: str) -> list[str]:
        q = DNSRecord.question(name, "A")
        while True:
            self.transport.sendto(q.pack())
            try:
                async with asyncio.timeout(DNS_TIMEOUT):
                    while True:
                        reply = DNSRecord.parse(await self.proto.replies.get())
                        if reply.header.id == q.header.id:
                            return [str(rr.rdata) for rr in reply.rr if rr.rtype == QTYPE.A]
            except TimeoutError:
                continue  # lost: ask again

    def close(self) -> None:
        self.transport.close()


# --- the benchmark ----------------------------------------------------------------------------


class Bench:
    def __init__(self, members: list[EtcdProcess], stack: contextlib.AsyncExitStack) -> None:
        self.members = members
        self.stack = stack
        self.urls: list[str] = []
        self.http = aiohttp.ClientSession()
        stack.push_async_callback(self.http.close)
        self.etcd = EtcdClient([members[0].client_url])
        stack.push_async_callback(self.etcd.close)
        self.dns: DNSProbe | None = None
        self.watcher: Watcher | None = None
        self.fanout: list[Watcher] = []
        self.dns_queries: list[int] = []  # per DNS sample, how many queries it took
        self.dns_rtt: list[float] = []  # each query's round trip: the polling's resolution
        self.n = 0  # instances registered so far: each gets its own IP and id

    async def start(self) -> None:
        urls = [m.client_url for m in self.members]
        ports = free_ports(len(self.members))
        for i, port in enumerate(ports):
            store = Store(EtcdClient([urls[i]] + urls[:i] + urls[i + 1 :]), prefix="/bench")
            self.stack.push_async_callback(store.close)
            runner = await serve(store, "127.0.0.1", port)
            self.stack.push_async_callback(runner.cleanup)
            self.urls.append(f"http://127.0.0.1:{port}")
            if i == 1:
                dns = DNSServer(store, [])
                await dns.start("127.0.0.1", 0)
                self.stack.push_async_callback(dns.stop)
                self.dns = await DNSProbe.open("127.0.0.1", dns.port)
                self.stack.callback(self.dns.close)
        for svc in ("watch", "fanout"):
            await self.call("PUT", f"/services/{svc}", {})
        self.watcher = Watcher(self.urls[2], "watch")
        self.stack.push_async_callback(self.watcher.close)
        for i in range(FANOUT_WATCHERS):
            w = Watcher(self.urls[i % len(self.urls)], "fanout")
            self.stack.push_async_callback(w.close)
            self.fanout.append(w)
        for w in [self.watcher, *self.fanout]:
            await w.wait_ready()

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        """One request to node 1's API."""
        async with self.http.request(method, self.urls[0] + path, json=body) as resp:
            data = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{method} {path}: HTTP {resp.status}: {data.decode()[:200]}")
            return json.loads(data) if data.strip() else None

    def instance(self) -> dict[str, Any]:
        self.n += 1
        addr = f"10.{self.n >> 16 & 255}.{self.n >> 8 & 255}.{self.n & 255}:8080"
        return {"id": instance_id("tcp", addr), "addr": addr, "proto": "tcp", "meta": {}}

    async def register(self, service: str, inst: dict[str, Any]) -> None:
        await self.call("PUT", f"/services/{service}/instances/{inst['id']}", inst)

    async def deregister(self, service: str, inst: dict[str, Any], watchers: list[Watcher]) -> None:
        downs = [w.expect(DOWN, inst["id"]) for w in watchers]
        await self.call("DELETE", f"/services/{service}/instances/{inst['id']}")
        async with asyncio.timeout(EVENT_TIMEOUT):
            await asyncio.gather(*downs)

    async def etcd_put(self) -> float:
        t0 = time.perf_counter()
        await self.etcd.put("/bench-ref/key", "0123456789abcdef")
        return time.perf_counter() - t0

    async def watch(self) -> tuple[float, float]:
        """(the registration's API round trip, registration → `up` in the watcher)"""
        assert self.watcher is not None
        inst = self.instance()
        up = self.watcher.expect(UP, inst["id"])
        t0 = time.perf_counter()
        await self.register("watch", inst)
        t_put = time.perf_counter()
        async with asyncio.timeout(EVENT_TIMEOUT):
            t1 = await up
        await self.deregister("watch", inst, [self.watcher])
        return t_put - t0, t1 - t0

    async def dns_visible(self) -> float:
        """Polling starts with the registration, not after its reply: the address may be
        visible before node 1 has answered the PUT."""
        assert self.dns is not None
        inst = self.instance()
        ip = inst["addr"].split(":")[0]
        svc = f"dns{self.n}"
        await self.call("PUT", f"/services/{svc}", {})
        t0 = time.perf_counter()
        put = asyncio.create_task(self.register(svc, inst))
        queries = 0
        try:
            async with asyncio.timeout(EVENT_TIMEOUT):
                while True:
                    queries += 1
                    q0 = time.perf_counter()
                    answer = await self.dns.a_records(f"{svc}.discoverd")
                    self.dns_rtt.append(time.perf_counter() - q0)
                    if ip in answer:
                        break
                    await asyncio.sleep(DNS_POLL)
            t1 = time.perf_counter()
        finally:
            if not put.done():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(put), EVENT_TIMEOUT)
            put.cancel()
        put.result()  # the registration itself must have succeeded
        self.dns_queries.append(queries)
        await self.call("DELETE", f"/services/{svc}")
        return t1 - t0

    async def fan_out(self) -> list[float]:
        inst = self.instance()
        ups = [w.expect(UP, inst["id"]) for w in self.fanout]
        t0 = time.perf_counter()
        await self.register("fanout", inst)
        async with asyncio.timeout(EVENT_TIMEOUT):
            arrived = await asyncio.gather(*ups)
        await self.deregister("fanout", inst, self.fanout)
        return [t - t0 for t in arrived]

    async def measure(self, samples: int, progress: bool) -> dict[str, list[float]]:
        """Samples in seconds by row key, and `fanout_node<n>`: each watcher's latency by the
        node it watches through (node 1 is the one registrations go to)."""
        out: dict[str, list[float]] = {key: [] for key, _ in ROWS}
        out.update({f"fanout_node{n + 1}": [] for n in range(len(self.urls))})
        for i in range(WARMUP + samples):
            if i == WARMUP:
                self.dns_queries.clear()
                self.dns_rtt.clear()
            put, watch, dns, each = (
                await self.etcd_put(), await self.watch(), await self.dns_visible(),
                await self.fan_out(),
            )  # fmt: skip
            if i < WARMUP:
                continue
            out["etcd_put"].append(put)
            out["register"].append(watch[0])
            out["watch"].append(watch[1])
            out["dns"].append(dns)
            out["fanout_last"].append(max(each))
            out["fanout_each"].extend(each)
            for j, t in enumerate(each):
                out[f"fanout_node{j % len(self.urls) + 1}"].append(t)
            if progress:
                print(f"\r  {i + 1 - WARMUP}/{samples}", end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
        return out


async def run_bench(members: list[EtcdProcess], samples: int, progress: bool) -> dict[str, Any]:
    main_task = asyncio.current_task()
    assert main_task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, main_task.cancel)
    async with contextlib.AsyncExitStack() as stack:
        bench = Bench(members, stack)
        await bench.start()
        raw = await bench.measure(samples, progress)
        queries, rtt = bench.dns_queries, bench.dns_rtt
        leader = await bench.etcd.leader_id()
        names = {str(m.get("ID")): m.get("name") for m in await bench.etcd.member_list()}
    ref = statistics.median(raw["etcd_put"])
    result: dict[str, Any] = {"samples": samples, "fanout_watchers": FANOUT_WATCHERS}
    # a put through a follower is forwarded to the leader: one more hop for the reference
    result["etcd_leader"] = names.get(leader or "", "?")
    result["ms"] = {key: summary(values) for key, values in raw.items()}
    result["ratio_to_etcd_put_median"] = {
        key: {k: round(v / (ref * 1000), 2) for k, v in result["ms"][key].items() if k != "min"}
        for key in raw
    }
    result["dns_queries_per_sample"] = {
        "median": statistics.median(queries),
        "max": max(queries),
        "query_round_trip_ms": summary(rtt),
    }
    result["samples_ms"] = {key: [round(x * 1000, 2) for x in v] for key, v in raw.items()}
    return result


def print_table(result: dict[str, Any]) -> None:
    print(f"discoverd, 3-member etcd cluster on loopback, {result['samples']} samples "
          "(ratios: against the etcd put median)")  # fmt: skip
    print(f"{'':40}{'median':>9}{'p95':>9}{'max':>9}{'×put med':>10}{'×put p95':>10}  ms")
    for key, label in ROWS:
        s, r = result["ms"][key], result["ratio_to_etcd_put_median"][key]
        print(f"{label:40}{s['median']:9.2f}{s['p95']:9.2f}{s['max']:9.2f}"
              f"{r['median']:9.2f}×{r['p95']:9.2f}×")  # fmt: skip
    nodes = sorted(k for k in result["ms"] if k.startswith("fanout_node"))
    each = ", ".join(
        f"node {k.removeprefix('fanout_node')} {result['ms'][k]['median']:.2f}/"
        f"{result['ms'][k]['p95']:.2f}"
        for k in nodes
    )
    print(f"fan-out per watcher by the node it watches through (median/p95 ms): {each}")
    q = result["dns_queries_per_sample"]
    print(f"etcd leader at the end: {result['etcd_leader']} (puts and registrations go to n1)")
    print(f"DNS queries until the address appeared: median {q['median']:g}, max {q['max']}; "
          f"one query's round trip (median/p95): {q['query_round_trip_ms']['median']:.2f}/"
          f"{q['query_round_trip_ms']['p95']:.2f} ms")  # fmt: skip


def on_etcd_cluster(
    prefix: str, bench: Callable[[list[EtcdProcess]], Awaitable[dict[str, Any]]]
) -> tuple[int, dict[str, Any] | None]:
    """Run `bench` on a fresh 3-member etcd cluster under a temporary directory; return the
    exit status and its result. Whatever happens (an error, Ctrl-C, SIGTERM) no etcd process
    and no directory is left; a leftover is reported and fails the run."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    members = make_members(base)
    on_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result: dict[str, Any] | None = None
    code = 0
    try:
        for m in members:
            m.start()
        for m in members:
            m.wait_healthy()
        result = asyncio.run(bench(members))
    except (OSError, RuntimeError, TimeoutError, EtcdError, aiohttp.ClientError) as e:
        print(f"error: {e!r}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except asyncio.CancelledError:  # SIGTERM while measuring
        print("terminated", file=sys.stderr)
        code = 143
    finally:
        # an impatient second Ctrl-C must not leave etcd running
        on_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for m in members:
            with contextlib.suppress(OSError):
                m.stop()
        left = etcd_left(base)
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)
        signal.signal(signal.SIGINT, on_int)
        signal.signal(signal.SIGTERM, on_term)
    if left:
        print(f"error: etcd processes were left running (killed): {left}", file=sys.stderr)
        code = code or 1
    if base.exists():
        print(f"error: could not remove {base}", file=sys.stderr)
        code = code or 1
    return code, result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=100, help="measured rounds")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = p.parse_args(argv)
    if args.samples < 1:
        p.error("--samples must be at least 1")
    if shutil.which("etcd") is None:
        print("error: etcd is not on PATH", file=sys.stderr)
        return 1

    code, result = on_etcd_cluster(
        "bench-discoverd-",
        lambda members: run_bench(members, args.samples, sys.stderr.isatty()),
    )
    if result is not None:
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print_table(result)
    return code


if __name__ == "__main__":
    sys.exit(main())
