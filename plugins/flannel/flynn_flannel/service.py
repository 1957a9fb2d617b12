"""`flynn-host component flannel`: the overlay network on one host (docs/flannel.md).

It finds discoverd (`--discoverd-url`, `DISCOVERD`, or by asking its host's status), makes sure
the network config is stored in service `flannel`'s meta, leases this host a subnet, sets up
the backend (`vxlan`: device `flannel.1` and one route, neighbour and fdb entry per other
host; `alloc`: the lease only), writes `/run/flannel/subnet.env`, tells its host the subnet
(`POST /host/network`) and then keeps the kernel in step with the leases by watching the
service's meta events, renewing its own lease an hour before it expires.

On SIGTERM it stops serving and leaves the device, its entries and the lease in place: a
restarted flannel finds the same lease and the host's jobs keep their addresses meanwhile.
`VxlanDevice.delete()` and `leases.release_lease()` are the clean-up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from flynn_discoverd.client import Client, UnreachableError
from flynn_discoverd.types import SERVICE_META

from flynn_flannel.leases import Acquired, NoFreeSubnetError, acquire_lease, ensure_config
from flynn_flannel.types import (
    LEASE_TTL,
    RENEW_MARGIN,
    SERVICE,
    ConfigError,
    FlannelState,
    Lease,
    NetworkConfig,
)
from flynn_flannel.vxlan import DEVICE, Peer, VxlanDevice, VxlanError
from flynn_host.atomicfile import write_atomic
from flynn_host.client import auth_headers, job_host_url, local_host_key

log = logging.getLogger("flannel")

DEFAULT_HTTP_PORT = 5002
STATUS_NEIGHBOURS = 5
PING_TIMEOUT = 1.0


class LeaseChangedError(Exception):
    """Renewing gave this host another subnet (its lease was lost meanwhile)."""


def say(message: str) -> None:
    print(f"flannel: {message}", flush=True)


def _env(*names: str) -> str:
    for name in names:
        value = os.environ.get(name, "")
        if value and value != "none":
            return value
    return ""


def parse_args(argv: list[str]) -> argparse.Namespace:
    env = os.environ
    external_ip = env.get("EXTERNAL_IP", "")
    p = argparse.ArgumentParser(prog="flynn-host component flannel")
    p.add_argument(
        "--discoverd-url",
        default=_env("DISCOVERD"),
        help="comma list of discoverd URLs (default: $DISCOVERD, else ask the host)",
    )
    p.add_argument("--host-url", default=job_host_url(), help="this host's API (to find discoverd)")
    p.add_argument("--iface", default=external_ip, help="this host's IP (default $EXTERNAL_IP)")
    p.add_argument("--network", default=_env("NETWORK", "FLANNEL_NETWORK"))
    p.add_argument("--backend", default=_env("BACKEND", "FLANNEL_BACKEND"))
    p.add_argument("--port", type=int, default=0, help="vxlan UDP port (default: kernel's)")
    p.add_argument("--http-port", type=int,
                   default=int(_env("PORT_0", "PORT") or DEFAULT_HTTP_PORT))  # fmt: skip
    p.add_argument("--subnet-file", default="/run/flannel/subnet.env")
    p.add_argument("--notify-url", default="", help="default: {host-url}/host/network")
    p.add_argument("--device", default=DEVICE, help=argparse.SUPPRESS)
    p.add_argument("--lease-ttl", type=float, default=LEASE_TTL.total_seconds(),
                   help=argparse.SUPPRESS)  # fmt: skip
    p.add_argument("--no-register", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- finding discoverd and telling the host -------------------------------------------------


async def wait_for_discoverd(http: aiohttp.ClientSession, host_url: str) -> list[str]:
    """Poll the host's status until it knows where discoverd is."""
    said = False
    while True:
        try:
            async with http.get(f"{host_url}/host/status", timeout=aiohttp.ClientTimeout(5)) as r:
                status = await r.json(content_type=None) if r.status == 200 else {}
            url = ((status or {}).get("discoverd") or {}).get("url")
            if url:
                return [u for u in str(url).split(",") if u.strip()]
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            log.debug("host status: %s", e)
        if not said:
            say("waiting for discoverd")
            said = True
        await asyncio.sleep(1)


async def notify_host(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> None:
    """POST the subnet to the host until it answers 2xx."""
    failures = 0
    while True:
        try:
            headers = auth_headers(local_host_key())  # a system job gets the host key
            async with http.post(url, json=body, headers=headers,
                                 timeout=aiohttp.ClientTimeout(10)) as r:  # fmt: skip
                if 200 <= r.status < 300:
                    return
                error = f"HTTP {r.status}: {(await r.text())[:200]}"
        except (aiohttp.ClientError, TimeoutError) as e:
            error = str(e) or type(e).__name__
        if failures == 0 or failures % 30 == 0:
            log.error("notifying host at %s: %s (retrying)", url, error)
        failures += 1
        await asyncio.sleep(1)


def write_subnet_file(path: Path, config: NetworkConfig, lease: Lease, mtu: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(
        path,
        f"FLANNEL_NETWORK={config.network}\n"
        f"FLANNEL_SUBNET={lease.gateway}/{lease.subnet.prefixlen}\n"
        f"FLANNEL_MTU={mtu}\n"
        "FLANNEL_IPMASQ=false\n",
        fsync=False,
    )


# ---- keeping the kernel in step -------------------------------------------------------------


def peers_of(state: FlannelState, own_ip: str) -> list[Peer]:
    """The other hosts' live vxlan leases."""
    return [
        Peer(lease.subnet, lease.public_ip, lease.vtep_mac)
        for lease in state.leases.values()
        if lease.public_ip != own_ip
        and lease.backend_type == "vxlan"
        and lease.vtep_mac
        and not lease.expired()
    ]


class Flannel:
    """One host's flannel once configured: its lease, its device, and the loops that keep
    both current."""

    def __init__(
        self, args: argparse.Namespace, client: Client, config: NetworkConfig, ip: str
    ) -> None:
        self.args = args
        self.client = client
        self.config = config
        self.ip = ip
        self.device = VxlanDevice(args.device) if config.backend == "vxlan" else None
        self.backend_data: dict[str, Any] = {}
        self.mtu = 0
        self.acquired: Acquired | None = None
        self.peer_count: int | None = None
        self.renew_now = asyncio.Event()

    @property
    def lease(self) -> Lease:
        assert self.acquired is not None
        return self.acquired.lease

    async def setup(self) -> None:
        if self.device is not None:
            info = await asyncio.to_thread(
                self.device.ensure, self.ip, None, self.config.vni, self.config.port
            )
            self.backend_data, self.mtu = {"VtepMAC": info.mac}, info.mtu
        else:
            _, self.mtu = await asyncio.to_thread(VxlanDevice().underlay, self.ip)
        self.acquired = await self._acquire()
        say(f"lease {self.lease.subnet} ({'new' if self.acquired.new else 'kept'})")
        if self.device is not None:
            await asyncio.to_thread(
                self.device.ensure, self.ip, self.lease.subnet, self.config.vni, self.config.port
            )
        write_subnet_file(Path(self.args.subnet_file), self.config, self.lease, self.mtu)
        say(f"network configured, mtu {self.mtu}")

    async def _acquire(self) -> Acquired:
        return await acquire_lease(
            self.client, self.ip, self.args.http_port, self.config.backend, self.backend_data,
            ttl=self.args.lease_ttl,
        )  # fmt: skip

    async def apply(self, state: FlannelState) -> None:
        """Bring the device's entries in line with `state`'s leases."""
        own = state.leases.get(self.lease.key)
        if own is None or own.public_ip != self.ip:
            log.error("this host's lease %s is gone from discoverd: leasing again", self.lease.key)
            self.renew_now.set()
        peers = peers_of(state, self.ip)
        if self.device is not None:
            changes = await asyncio.to_thread(self.device.sync_peers, peers)
            if changes.added or changes.removed:
                log.info("%s: %d entries added, %d removed", DEVICE, changes.added, changes.removed)
        if len(peers) != self.peer_count:
            self.peer_count = len(peers)
            say(f"{len(peers)} peer(s)")

    async def watch(self) -> None:
        """Follow the meta's events (the current meta first, then every change)."""
        async for event in self.client.watch(SERVICE, kinds=[SERVICE_META]):
            if event.service_meta is None:
                continue
            try:
                await self.apply(FlannelState.from_json(event.service_meta.data))
            except (ConfigError, VxlanError, OSError) as e:
                log.error("applying leases: %s", e)

    async def renew(self) -> None:
        """Renew the lease before it expires (or at once when it went missing). A lease that
        comes back with another subnet means this host must be reconfigured: exit."""
        while True:
            ttl = self.args.lease_ttl
            margin = min(RENEW_MARGIN.total_seconds(), ttl / 2)
            wait = (self.lease.expiration - datetime.now(UTC)).total_seconds() - margin
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.renew_now.wait(), timeout=max(wait, 0))
            self.renew_now.clear()
            try:
                acquired = await self._acquire()
            except (NoFreeSubnetError, ConfigError):
                raise
            except Exception as e:  # discoverd unreachable for now: keep trying
                log.error("renewing lease %s: %s (retrying)", self.lease.key, e)
                await asyncio.sleep(min(10.0, max(margin / 10, 0.5)))
                self.renew_now.set()
                continue
            if acquired.lease.subnet != self.lease.subnet:
                raise LeaseChangedError(
                    f"lease changed from {self.lease.subnet} to {acquired.lease.subnet}: "
                    "exiting, to be restarted and reconfigured"
                )
            self.acquired = acquired
            log.info("lease %s renewed until %s", self.lease.key, self.lease.expiration)


# ---- HTTP -----------------------------------------------------------------------------------

FLANNEL = web.AppKey("flannel", Flannel)


async def ping(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def status(request: web.Request) -> web.Response:
    """Ping up to five other hosts' flannel (`PublicIP:HTTPPort/ping`, 1 s each)."""
    flannel = request.app[FLANNEL]
    meta = await flannel.client.get_meta(SERVICE)
    state = FlannelState.from_json(meta.data if meta else None)
    others = [
        lease
        for lease in sorted(state.leases.values(), key=lambda lease: lease.subnet)
        if lease.public_ip != flannel.ip and not lease.expired() and lease.http_port
    ][:STATUS_NEIGHBOURS]
    timeout = aiohttp.ClientTimeout(total=PING_TIMEOUT)

    async def check(http: aiohttp.ClientSession, lease: Lease) -> dict[str, Any]:
        addr = f"{lease.public_ip}:{lease.http_port}"
        try:
            async with http.get(f"http://{addr}/ping", timeout=timeout) as r:
                ok = r.status == 200
                return {"addr": addr, "ok": ok, **({} if ok else {"error": f"HTTP {r.status}"})}
        except (aiohttp.ClientError, TimeoutError) as e:
            return {"addr": addr, "ok": False, "error": str(e) or type(e).__name__}

    async with aiohttp.ClientSession() as http:
        results = await asyncio.gather(*(check(http, lease) for lease in others))
    neighbours = {lease.key: r for lease, r in zip(others, results, strict=True)}
    healthy = all(r["ok"] for r in results)
    body = {
        "status": "healthy" if healthy else "unhealthy",
        "subnet": str(flannel.lease.subnet),
        "neighbours": neighbours,
    }
    return web.json_response(body, status=200 if healthy else 500)


async def serve_http(flannel: Flannel, port: int) -> web.AppRunner:
    app = web.Application()
    app[FLANNEL] = flannel
    app.router.add_get("/ping", ping)
    app.router.add_get("/status", status)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, None, port).start()
    return runner


# ---- the component --------------------------------------------------------------------------


async def reach_discoverd(client: Client, wanted: NetworkConfig) -> NetworkConfig:
    """Store (or read) the network config, waiting while discoverd does not answer yet."""
    failures = 0
    while True:
        try:
            return await ensure_config(client, wanted)
        except (UnreachableError, aiohttp.ClientError, TimeoutError) as e:
            if failures % 30 == 0:
                log.error("discoverd: %s (retrying)", e)
            failures += 1
            await asyncio.sleep(1)


async def run(args: argparse.Namespace) -> int:
    try:
        wanted = NetworkConfig.make(args.network, args.backend, port=args.port)
    except ConfigError as e:
        print(f"flannel: error: {e}", file=sys.stderr, flush=True)
        return 2
    if not args.iface:
        print("flannel: error: no --iface and EXTERNAL_IP is not set", file=sys.stderr, flush=True)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        urls = [u for u in args.discoverd_url.split(",") if u.strip()]
        if not urls:
            urls = await wait_for_discoverd(http, args.host_url)
        client = await stack.enter_async_context(Client(urls))
        try:
            config = await reach_discoverd(client, wanted)
            flannel = Flannel(args, client, config, args.iface)
            await flannel.setup()
        except (ConfigError, NoFreeSubnetError, VxlanError) as e:
            print(f"flannel: error: {e}", file=sys.stderr, flush=True)
            return 1
        notify_url = args.notify_url or f"{args.host_url}/host/network"
        job_id = os.environ.get("FLYNN_JOB_ID") or os.environ.get("HOSTNAME", "")
        body = {"job_id": job_id, "subnet": str(flannel.lease.subnet), "mtu": flannel.mtu}
        await notify_host(http, notify_url, body)
        say(f"told the host at {notify_url}")
        runner = await serve_http(flannel, args.http_port)
        stack.push_async_callback(runner.cleanup)
        if not args.no_register:
            await client.register(SERVICE, f"{args.iface}:{args.http_port}")
        say(f"serving on port {args.http_port}")
        tasks = {asyncio.ensure_future(flannel.watch()), asyncio.ensure_future(flannel.renew())}
        stopped = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({*tasks, stopped}, return_when=asyncio.FIRST_COMPLETED)
        for task in (*tasks, stopped):
            task.cancel()
        for task in done - {stopped}:
            exc = task.exception()
            if exc is not None:
                print(f"flannel: error: {exc}", file=sys.stderr, flush=True)
                return 1
    # the device, its entries and the lease stay: a restart keeps the same subnet
    say("stopped (device and lease left in place)")
    return 0


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return asyncio.run(run(parse_args(argv)))
