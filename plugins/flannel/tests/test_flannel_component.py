"""`flynn-host component flannel` end to end: two components, each in its own network
namespace "host", against a real discoverd (etcd on loopback; its API and a stand-in host API
served by the test on sockets opened inside namespace A, so both namespaces reach them over the
veth). They find discoverd through the host's status, lease subnets, build the overlay, tell
the host, answer /ping and /status, keep their lease across a restart and follow lease
changes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from flannel_netns import TwoHosts, ip
from flynn_discoverd.client import Client
from flynn_discoverd.server import make_app
from flynn_flannel.leases import release_lease
from flynn_flannel.types import SERVICE
from flynn_flannel.vxlan import VxlanDevice
from pyroute2 import netns

from flynn_host.dev.host import wait_for_async

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

FLYNN_HOST = Path(sys.executable).parent / "flynn-host"
HTTP_PORT = 5002  # free inside the namespaces whatever the machine runs


def listen_in(name: str, addr: str) -> socket.socket:
    """A listening TCP socket opened inside network namespace `name` (a socket stays in the
    namespace it was made in, whoever serves it)."""
    netns.pushns(name)
    try:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, 0))
    finally:
        netns.popns()
    return s


@dataclass
class FakeHost:
    """The parts of flynn-host's API flannel uses."""

    discoverd_url: str = ""
    networks: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> web.Application:
        async def status(request: web.Request) -> web.Response:
            return web.json_response(
                {"discoverd": {"url": self.discoverd_url} if self.discoverd_url else None}
            )

        async def network(request: web.Request) -> web.Response:
            self.networks.append(await request.json())
            return web.json_response({})

        app = web.Application()
        app.router.add_get("/host/status", status)
        app.router.add_post("/host/network", network)
        return app


async def serve_on(app: web.Application, *socks: socket.socket) -> web.AppRunner:
    runner = web.AppRunner(app, shutdown_timeout=0.5, handler_cancellation=True)
    await runner.setup()
    for sock in socks:
        await web.SockSite(runner, sock).start()
    return runner


@dataclass
class Component:
    netns: str
    iface: str
    host_url: str
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.netns}.log"

    @property
    def subnet_file(self) -> Path:
        return self.workdir / f"{self.netns}-subnet.env"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("DISCOVERD", "EXTERNAL_IP")}
        env["FLYNN_JOB_ID"] = f"job-{self.netns}"
        cmd = [
            "ip", "netns", "exec", self.netns, str(FLYNN_HOST), "component", "flannel",
            "--iface", self.iface, "--host-url", self.host_url, "--http-port", str(HTTP_PORT),
            "--subnet-file", str(self.subnet_file),
        ]  # fmt: skip
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def wget(netns_name: str, url: str) -> tuple[bool, str]:
    """GET from inside a namespace (blocks: call via a thread, the test serves discoverd)."""
    cmd = ["ip", "netns", "exec", netns_name, "busybox", "wget", "-q", "-O", "-", url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    return proc.returncode == 0, proc.stdout


def ping(netns_name: str, src: str, dst: str) -> bool:
    cmd = ["ip", "netns", "exec", netns_name, "busybox", "ping", "-c1", "-W1", "-I", src, dst]
    return subprocess.run(cmd, capture_output=True).returncode == 0


@pytest.fixture
async def world(two_hosts: TwoHosts, store, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:  # type: ignore[no-untyped-def]
    host = FakeHost()
    d_sock, h_sock = listen_in(two_hosts.a, two_hosts.ip_a), listen_in(two_hosts.a, two_hosts.ip_a)
    # discoverd answers in namespace A for the components and on loopback for the test
    local = socket.socket()
    local.bind(("127.0.0.1", 0))
    runners = [
        await serve_on(make_app(store), d_sock, local),
        await serve_on(host.app(), h_sock),
    ]
    client = Client([f"http://127.0.0.1:{local.getsockname()[1]}"])
    discoverd_url = f"http://{two_hosts.ip_a}:{d_sock.getsockname()[1]}"
    host_url = f"http://{two_hosts.ip_a}:{h_sock.getsockname()[1]}"
    components = [
        Component(two_hosts.a, two_hosts.ip_a, host_url, tmp_path),
        Component(two_hosts.b, two_hosts.ip_b, host_url, tmp_path),
    ]
    try:
        yield {"hosts": two_hosts, "host": host, "discoverd_url": discoverd_url,
               "components": components, "client": client}  # fmt: skip
    finally:
        for c in components:  # in a thread: stopping, a component deregisters from discoverd
            await asyncio.to_thread(c.stop)
        await client.close()
        for r in runners:
            await r.cleanup()


async def test_two_hosts_end_to_end(world: dict[str, Any], store) -> None:  # type: ignore[no-untyped-def]
    hosts: TwoHosts = world["hosts"]
    host: FakeHost = world["host"]
    a, b = world["components"]
    a.start()
    await wait_for_async(
        lambda: "waiting for discoverd" in a.output(), 15, "a to wait for discoverd"
    )
    host.discoverd_url = world["discoverd_url"]
    b.start()
    try:
        await wait_for_async(
            lambda: a.subnet_file.exists() and b.subnet_file.exists(), 15, "subnet files"
        )
        await wait_for_async(
            lambda: "1 peer(s)" in a.output() and "1 peer(s)" in b.output(), 15, "peers"
        )
        await wait_for_async(lambda: len(host.networks) == 2, 15, "both hosts told")
    except AssertionError:
        pytest.fail(f"A:\n{a.output()}\nB:\n{b.output()}")
    envs = {
        c.netns: dict(line.split("=", 1) for line in c.subnet_file.read_text().split())
        for c in (a, b)
    }
    subnets = sorted(e["FLANNEL_SUBNET"] for e in envs.values())
    assert subnets == ["100.100.1.1/24", "100.100.2.1/24"]
    for e in envs.values():
        assert e["FLANNEL_NETWORK"] == "100.100.0.0/16"
        assert e["FLANNEL_MTU"] == "1450" and e["FLANNEL_IPMASQ"] == "false"
    by_job = {n["job_id"]: n for n in host.networks}
    subnet_a = by_job[f"job-{hosts.a}"]["subnet"]
    subnet_b = by_job[f"job-{hosts.b}"]["subnet"]
    assert by_job[f"job-{hosts.a}"]["mtu"] == 1450
    assert f"flannel: lease {subnet_a} (new)" in a.output()
    assert "flannel: network configured, mtu 1450" in a.output()

    # the overlay carries traffic between the leases' .1 addresses (the hosts' bridges)
    gw_a, gw_b = subnet_a.replace(".0/24", ".1"), subnet_b.replace(".0/24", ".1")
    for ns, gw in ((hosts.a, gw_a), (hosts.b, gw_b)):
        ip("-n", ns, "link", "add", "tfbridge", "type", "bridge")
        ip("-n", ns, "addr", "add", f"{gw}/24", "dev", "tfbridge")
        ip("-n", ns, "link", "set", "tfbridge", "up")
    assert ping(hosts.a, gw_a, gw_b) and ping(hosts.b, gw_b, gw_a)

    # HTTP: /ping, and /status pinging the neighbour
    ok, _ = await asyncio.to_thread(wget, hosts.b, f"http://{hosts.ip_a}:{HTTP_PORT}/ping")
    assert ok
    ok, body = await asyncio.to_thread(wget, hosts.a, f"http://{hosts.ip_a}:{HTTP_PORT}/status")
    assert ok, body
    status = json.loads(body)
    assert status["status"] == "healthy"
    assert [n["addr"] for n in status["neighbours"].values()] == [f"{hosts.ip_b}:{HTTP_PORT}"]
    client: Client = world["client"]
    addrs = sorted(i.addr for i in await client.instances(SERVICE))
    assert addrs == sorted(f"{h}:{HTTP_PORT}" for h in (hosts.ip_a, hosts.ip_b))

    # B stops: device and lease stay; A's /status now fails for B
    assert await asyncio.to_thread(b.stop) == 0
    assert "stopped (device and lease left in place)" in b.output()
    # pyroute2's synchronous API cannot run on a thread with a running event loop
    assert await asyncio.to_thread(VxlanDevice(netns=hosts.b).exists)
    ok, _ = await asyncio.to_thread(wget, hosts.a, f"http://{hosts.ip_a}:{HTTP_PORT}/status")
    assert not ok  # 500: B does not answer
    # B restarts and keeps its subnet
    b.start()
    await wait_for_async(
        lambda: f"flannel: lease {subnet_b} (kept)" in b.output(), 15, "b's lease kept"
    )
    assert await asyncio.to_thread(b.stop) == 0

    # B's lease disappears from discoverd: A removes B's route, neighbour and fdb entry
    device_a = VxlanDevice(netns=hosts.a)
    entries = await asyncio.to_thread(device_a.entries)
    assert entries["routes"] == {(subnet_b, subnet_b.split("/")[0])}
    assert await release_lease(client, hosts.ip_b)
    empty = {"routes": set(), "neighbours": set(), "fdb": set()}

    async def a_forgot_b() -> bool:
        return await asyncio.to_thread(device_a.entries) == empty

    await wait_for_async(a_forgot_b, 15, "B's entries removed from A")
    await wait_for_async(lambda: "0 peer(s)" in a.output(), 15, "a to count 0 peers")
    assert not ping(hosts.a, gw_a, gw_b)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--network", "100.100.0.0/33"], "is not a valid IPv4 CIDR"),
        (["--network", "10.0.0.0/30"], "is too small"),
        (["--backend", "host-gw"], "backend 'host-gw' is not supported"),
        ([], "no --iface and EXTERNAL_IP is not set"),
    ],
)
def test_bad_input_exits_non_zero(args: list[str], message: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("EXTERNAL_IP", "NETWORK", "BACKEND")}
    iface = ["--iface", "10.211.0.1"] if args else []
    cmd = [str(FLYNN_HOST), "component", "flannel", *iface, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 2
    assert "flannel: error: " in proc.stderr and message in proc.stderr
