"""`flynn-host component discoverd`: one discoverd node. It supervises one etcd member, serves
Flynn's discoverd API (`--addr`, default :1111) and DNS (`--dns-addr`), and tells its host
where it answers (`--notify`, Flynn's `POST /host/discoverd`). With `--wait-net-dns` (as in
bootstrap) the DNS server starts on the host's bridge address, port 53, once flannel has given
the host its job network: that is the nameserver in every job's `/etc/resolv.conf`.

Peers come from `--peers` or `DISCOVERD_PEERS` (`ip:port,...`, the discoverd addresses of every
node). Each node's etcd member listens beside its API port: clients on port + 1268 and peers on
port + 1269 (2379 and 2380 for the default 1111), so peers need only each other's discoverd
addresses. A node whose data directory already holds a member rejoins with it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import time
import urllib.request
from pathlib import Path

from flynn_discoverd.dns import DNSServer
from flynn_discoverd.etcd import EtcdClient, EtcdError, EtcdProcess
from flynn_discoverd.server import SHUTDOWN, serve
from flynn_discoverd.store import Store
from flynn_discoverd.types import ETCD_CLIENT_PORT_OFFSET, ETCD_PEER_PORT_OFFSET
from flynn_host.client import (
    HostAPIError,
    HostClient,
    auth_headers,
    job_host_url,
    local_host_key,
)

log = logging.getLogger("discoverd")

CLIENT_PORT_OFFSET = ETCD_CLIENT_PORT_OFFSET
# how long a request waits for etcd to elect a leader before it fails (etcd's elections here
# take a few hundred milliseconds)
ELECTION_WAIT = 1.5
PEER_PORT_OFFSET = ETCD_PEER_PORT_OFFSET


def split_addr(addr: str, default_host: str = "") -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not port.isdigit():
        raise ValueError(f"invalid address {addr!r}: expected [ip]:port")
    return host or default_host, int(port)


def member_name(host: str, port: int) -> str:
    return f"discoverd-{host.replace('.', '-').replace(':', '-')}-{port}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    env = os.environ
    p = argparse.ArgumentParser(prog="flynn-host component discoverd")
    p.add_argument("--data-dir", default=env.get("DISCOVERD_DATA_DIR", "/data"))
    p.add_argument("--host", default=env.get("EXTERNAL_IP", "127.0.0.1"),
                   help="the address other nodes and clients reach this node at")  # fmt: skip
    p.add_argument("--addr", default=f"{env.get('LISTEN_IP', '')}:{env.get('PORT_0', '1111')}")
    p.add_argument("--peers", default=env.get("DISCOVERD_PEERS", ""))
    p.add_argument("--dns-addr", default=env.get("DISCOVERD_DNS_ADDR", ""))
    p.add_argument(
        "--recursors", default=None, help="comma list of ip[:port] (default: the host's)"
    )
    p.add_argument("--wait-net-dns", action="store_true",
                   default=env.get("DISCOVERD_WAIT_NET_DNS", "") in ("1", "true"),
                   help="serve DNS on the host bridge address, port 53, once the host has a "
                        "job network (flannel configured it)")  # fmt: skip
    p.add_argument("--host-url", default=job_host_url(),
                   help="the host API (default http://$EXTERNAL_IP:1113)")  # fmt: skip
    p.add_argument("--notify", default=env.get("DISCOVERD_NOTIFY"),
                   help="URL to POST {job_id,url,dns} to once serving (default: the host "
                        "API's /host/discoverd when running as a job; '' for none)")  # fmt: skip
    args = p.parse_args(argv)
    if args.notify is None:
        args.notify = f"{args.host_url}/host/discoverd" if env.get("EXTERNAL_IP") else ""
    return args


async def wait_host_network(host_url: str, every: float = 1.0) -> str:
    """The host's bridge address, once flannel has given the host its subnet."""
    host = HostClient(host_url, timeout=5)
    said = False
    while True:
        try:
            network = (await asyncio.to_thread(host.status)).get("network") or {}
        except (OSError, ValueError, HostAPIError) as exc:
            network = {}
            if not said:
                log.info("host API %s not answering yet: %s", host_url, exc)
        if network.get("subnet"):
            net = ipaddress.IPv4Network(network["subnet"], strict=False)
            return str(net.network_address + 1)
        if not said:
            log.info("waiting for the host's job network to serve DNS on its bridge")
            said = True
        await asyncio.sleep(every)


async def supervise(member: EtcdProcess, every: float = 1.0) -> None:
    """Restart the etcd member if it exits: it rejoins from its data directory."""
    while True:
        await asyncio.sleep(every)
        if not member.running:
            code = member.proc.returncode if member.proc else None
            log.warning("etcd member %s exited (status %s): restarting it", member.name, code)
            member.cluster_state = "existing"
            member.start()


async def stop_member(member: EtcdProcess) -> None:
    """Stop the etcd member (it stays a member: a node started again on the same data
    rejoins with it), off the event loop."""
    began = time.monotonic()
    await asyncio.to_thread(member.stop)
    log.info("etcd member stopped in %.2fs", time.monotonic() - began)


def notify(url: str, body: dict[str, str]) -> None:
    headers = {"Content-Type": "application/json", **auth_headers(local_host_key())}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers=headers)  # fmt: skip
    with urllib.request.urlopen(req, timeout=10):
        pass


async def notify_until_answered(url: str, body: dict[str, str], every: float = 1.0) -> None:
    """Tell the host where discoverd answers; keep trying while the host API is away."""
    while True:
        try:
            await asyncio.to_thread(notify, url, body)
            return
        except OSError as exc:
            log.warning("telling the host at %s failed, retrying: %s", url, exc)
            await asyncio.sleep(every)


async def net_dns(
    store: Store, args: argparse.Namespace, recursors: list[str] | None, state: dict[str, str]
) -> None:
    """`--wait-net-dns`: serve DNS on the bridge address once there is one, then tell the host."""
    ip = await wait_host_network(args.host_url)
    dns = DNSServer(store, recursors)
    await dns.start(ip, 53)
    state["dns"] = f"{ip}:53"
    log.info("discoverd DNS on %s", state["dns"])
    try:
        if args.notify:
            await notify_until_answered(args.notify, state)
        await asyncio.Event().wait()
    finally:
        await dns.stop()


async def join_running_cluster(
    endpoints: list[str], name: str, peer_url: str
) -> dict[str, str] | None:
    """A node starting without data while the others already run a cluster (it was lost with
    its host and comes back): replace its old membership with a new one, as etcd's runbook
    says, and return the cluster to join. None while no cluster answers (first boot) or when
    this node is a member that never started (the first boot is still under way: etcd lists
    the initial cluster's members by name, the ones that never ran without client URLs)."""
    async with EtcdClient(endpoints, timeout=1.0) as etcd:
        try:
            members = await etcd.member_list()
        except EtcdError:
            return None
        mine = [m for m in members if peer_url in m.get("peerURLs", [])]
        if mine and not mine[0].get("clientURLs"):
            return None  # listed in the initial cluster, never started: a first boot
        for m in mine:
            log.info("replacing etcd member %s: this node lost its data", m.get("name"))
            await etcd.member_remove(m["ID"])
        await etcd.member_add([peer_url])
        members = await etcd.member_list()
    cluster = {m["name"]: m["peerURLs"][0] for m in members if m.get("name")}
    cluster[name] = peer_url
    log.info("joining the running etcd cluster of %d members", len(cluster))
    return cluster


async def run(args: argparse.Namespace) -> int:
    listen_ip, port = split_addr(args.addr)
    host = args.host
    peers = [split_addr(p.strip(), host) for p in args.peers.split(",") if p.strip()]
    if (host, port) not in peers:
        peers.append((host, port))
    initial = {member_name(h, p): f"http://{h}:{p + PEER_PORT_OFFSET}" for h, p in peers}
    name = member_name(host, port)
    data_dir = Path(args.data_dir) / "etcd"
    existing = (data_dir / "member").exists()
    others = [f"http://{h}:{p + CLIENT_PORT_OFFSET}" for h, p in peers if (h, p) != (host, port)]
    if not existing and others:
        peer_url = f"http://{host}:{port + PEER_PORT_OFFSET}"
        joined = await join_running_cluster(others, name, peer_url)
        if joined is not None:
            initial, existing = joined, True
    member = EtcdProcess(
        name, data_dir, ip=host, client_port=port + CLIENT_PORT_OFFSET,
        peer_port=port + PEER_PORT_OFFSET, initial_cluster=initial,
        cluster_state="existing" if existing else "new",
    )  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with contextlib.AsyncExitStack() as stack:
        member.start()
        stack.push_async_callback(stop_member, member)
        log.info("etcd member %s starting (%d peers)", name, len(initial))
        await member.wait_healthy_async(within=120)
        endpoints = [member.client_url] + [
            f"http://{h}:{p + CLIENT_PORT_OFFSET}" for h, p in peers if (h, p) != (host, port)
        ]
        # an etcd election (a member stopping, as in a deployment) is waited out, not a 500
        etcd = EtcdClient(endpoints, retry_within=ELECTION_WAIT)
        store = Store(etcd, node_name=name, advertise=f"http://{host}:{port}")
        stack.push_async_callback(store.close)
        await store.start()
        runner = await serve(store, listen_ip or None, port)  # type: ignore[arg-type]
        stack.push_async_callback(runner.cleanup)
        log.info("discoverd API on %s:%d", listen_ip or "*", port)
        dns_addr = ""
        recursors = (
            [r for r in args.recursors.split(",") if r] if args.recursors is not None else None
        )
        if args.dns_addr:
            dns_ip, dns_port = split_addr(args.dns_addr, host)
            dns = DNSServer(store, recursors)
            await dns.start(dns_ip, dns_port)
            stack.push_async_callback(dns.stop)
            dns_addr = f"{dns_ip}:{dns.port}"
            log.info("discoverd DNS on %s", dns_addr)
        body = {
            "job_id": os.environ.get("FLYNN_JOB_ID") or os.environ.get("HOSTNAME", ""),
            "url": f"http://{host}:{port}",
            "dns": dns_addr,
        }
        if args.notify:
            await notify_until_answered(args.notify, body)
        if args.wait_net_dns and not args.dns_addr:
            dns_task = asyncio.ensure_future(net_dns(store, args, recursors, body))
            stack.callback(dns_task.cancel)
        supervisor = asyncio.ensure_future(supervise(member))
        stack.callback(supervisor.cancel)
        print(f"discoverd: serving on {host}:{port}", flush=True)
        shutdown = asyncio.ensure_future(runner.app[SHUTDOWN].wait())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait({shutdown, stopped}, return_when=asyncio.FIRST_COMPLETED)
        shutdown.cancel()
        stopped.cancel()
        log.info("stopping")
    print("discoverd: stopped", flush=True)
    return 0


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return asyncio.run(run(parse_args(argv)))
