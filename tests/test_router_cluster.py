"""The router in a booted one-host cluster (shared by the module), used as a user would from
the machine: the `flynn cluster add -p <pin> ...` line bootstrap prints works as printed
(`https://controller.<domain>` resolves through the /etc/hosts line `script/cluster up` adds,
and the router serves the cluster certificate the pin names), `flynn apps` and an attached
`flynn run` go through it, an app's web jobs answer on `<app>.<domain>` over HTTP and HTTPS,
`flynn route add`/`remove` take effect within a second, and scaling down behind a
`drain_backends` route lets a request in flight finish."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from flynn_host.dev.cluster import Cluster
from tests.dev.test_cluster import booted_cluster

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)")

BUSYBOX = "file:///var/lib/flynn/images/busybox/manifest.json"
FLYNN = os.path.join(os.path.dirname(sys.executable), "flynn")
WEB = {
    "cmd": ["sh", "-c", "echo $FLYNN_JOB_ID > /tmp/index.html; exec httpd -f -p 8080 -h /tmp"],
    "ports": [{"port": 8080, "proto": "tcp", "service": {"name": "hello-web", "create": True}}],
}


def system_job_env(c: Cluster, app: str) -> dict[str, str]:
    for job in c.client(1).list_jobs(active=True).values():
        if (job["job"].get("metadata") or {}).get("flynn-controller.app_name") == app:
            return dict(job["job"]["config"]["env"])
    raise AssertionError(f"no job of {app}")


@dataclass
class Env:
    cluster: Cluster
    home: Path
    pin: str
    key: str
    ca: str

    @property
    def domain(self) -> str:
        return self.cluster.domain

    def flynn(
        self, *args: str, timeout: float = 120, rc: str = ".flynnrc"
    ) -> subprocess.CompletedProcess[str]:
        """The CLI from the machine itself (not a host's namespace), with a private HOME."""
        env = {**os.environ, "HOME": str(self.home), "FLYNNRC": str(self.home / rc)}
        return subprocess.run([FLYNN, *args], env=env, capture_output=True, text=True,
                              timeout=timeout, cwd=str(self.home))  # fmt: skip

    def ok(self, *args: str, **kw: Any) -> str:
        out = self.flynn(*args, **kw)
        assert out.returncode == 0, (args, out.stdout, out.stderr)
        return out.stdout + out.stderr

    def http(
        self, host: str, path: str = "/", port: int = 80, tls: bool = False
    ) -> tuple[int, str]:
        """GET through the router on the host's address, `Host: host` (and SNI `host`)."""
        ip = self.cluster.ips()[0]
        sock: socket.socket = socket.create_connection((ip, port), timeout=5)
        try:
            if tls:
                ctx = ssl.create_default_context(cadata=self.ca)
                sock = ctx.wrap_socket(sock, server_hostname=host)
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        finally:
            sock.close()
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body.decode(errors="replace")


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while True:
        try:
            if check():
                return time.monotonic() - start
        except OSError:
            pass
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with booted_cluster(1) as c:
        router = system_job_env(c, "router")
        der = x509.load_pem_x509_certificate(router["TLSCERT"].encode()).public_bytes(Encoding.DER)
        pin = base64.b64encode(hashlib.sha256(der).digest()).decode()
        key = router["CONTROLLER_KEY"]
        ca = system_job_env(c, "controller")["CA_CERT"]
        yield Env(c, tmp_path_factory.mktemp("router-home"), pin, key, ca)


def test_the_printed_cluster_add_line_works_through_the_router(env: Env) -> None:
    # the controller's name resolves on the machine, to the first host (its router)
    assert socket.gethostbyname(f"controller.{env.domain}") == env.cluster.ips()[0]
    env.ok("cluster", "add", "-p", env.pin, "default", env.domain, env.key)
    apps = env.ok("apps")
    assert re.search(r"^\S+\s+controller$", apps, re.M) and re.search(r"\brouter$", apps, re.M)
    env.ok("create", "-r", "", "hello")
    path = env.home / "release.json"
    path.write_text(json.dumps({"processes": {"web": WEB}}))
    env.ok("-a", "hello", "release", "add", "-t", "flynn", "-f", str(path), BUSYBOX)
    # an attached job over the pinned TLS connection, through the router's upgrade
    out = env.flynn("-a", "hello", "run", "--", "echo", "hi")
    assert (out.returncode, out.stdout) == (0, "hi\n"), out.stderr
    # a wrong pin is refused before anything is sent (cluster add fetches the CA through it)
    out = env.flynn("cluster", "add", "-p", base64.b64encode(b"x" * 32).decode(), "wrong",
                    env.domain, env.key, rc="wrong.flynnrc")  # fmt: skip
    assert out.returncode != 0 and "did not match the provided pin" in out.stderr, out.stderr
    assert (
        not (env.home / "wrong.flynnrc").exists()
        or "wrong" not in (env.home / "wrong.flynnrc").read_text()
    )


def test_an_apps_web_jobs_answer_on_its_domain_over_http_and_https(env: Env) -> None:
    env.ok("-a", "hello", "scale", "web=2")
    host = f"hello.{env.domain}"
    seen: set[str] = set()

    def both() -> bool:
        status, body = env.http(host)
        if status == 200:
            seen.add(body.strip())
        return len(seen) == 2

    wait_for(both, 60, "both web jobs answer through the router")
    jobs = {line.split()[0] for line in env.ok("-a", "hello", "ps").splitlines()[1:]}
    assert seen <= jobs, (seen, jobs)
    # HTTPS: the cluster certificate (*.<domain>) verifies against the cluster CA
    status, body = env.http(host, tls=True, port=443)
    assert status == 200 and body.strip() in jobs
    assert env.http(f"nothing.{env.domain}")[0] == 404


def test_routes_added_and_removed_with_the_cli_take_effect_within_a_second(env: Env) -> None:
    other = "other-hello.test"
    added = env.ok("-a", "hello", "route", "add", "http", "-s", "hello-web", other)
    route_id = added.strip().splitlines()[-1]
    took = wait_for(lambda: env.http(other)[0] == 200, 1.0, "the new route serves")
    print(f"http route: served {took * 1000:.0f} ms after `flynn route add` returned")
    env.ok("-a", "hello", "route", "remove", route_id)
    took = wait_for(lambda: env.http(other)[0] == 404, 1.0, "the removed route is gone")
    print(f"http route: 404 {took * 1000:.0f} ms after `flynn route remove` returned")

    out = env.ok("-a", "hello", "route", "add", "tcp", "-s", "hello-web")
    m = re.search(r"(tcp/\S+) listening on port (\d+)", out)
    assert m, out
    port = int(m.group(2))
    took = wait_for(lambda: env.http("anything", port=port)[0] == 200, 1.0, "the TCP route")
    print(f"tcp route: answering {took * 1000:.0f} ms after `flynn route add` returned")
    env.ok("-a", "hello", "route", "remove", m.group(1))

    def refused() -> bool:
        try:
            env.http("anything", port=port)
        except ConnectionRefusedError:
            return True
        return False

    wait_for(refused, 1.0, "the removed TCP route's port closes")


SLOW_WEB = {
    # busybox httpd with a CGI that answers after 3 s: a request still in flight at scale-down
    "cmd": ["sh", "-c", "mkdir -p /tmp/www/cgi-bin && printf '%s\\n' '#!/bin/sh' 'sleep 3'"
            " 'printf \"Content-Type: text/plain\\r\\n\\r\\n\"' 'echo slow done'"
            " > /tmp/www/cgi-bin/slow && chmod +x /tmp/www/cgi-bin/slow"
            " && echo ok > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www"],
    "ports": [{"port": 8080, "proto": "tcp", "service": {"name": "slow-web", "create": True}}],
}  # fmt: skip


def test_a_drain_route_lets_a_request_in_flight_finish_before_its_job_stops(env: Env) -> None:
    env.ok("create", "-r", "", "slow")
    path = env.home / "slow-release.json"
    path.write_text(json.dumps({"processes": {"web": SLOW_WEB}}))
    env.ok("-a", "slow", "release", "add", "-t", "flynn", "-f", str(path), BUSYBOX)
    env.ok("-a", "slow", "scale", "web=1")
    domain = f"slow-drain.{env.domain}"  # slow.<domain> is the route `create` made
    # drain_backends is the API's (the 2015 CLI has no flag for it), through the router too
    ctx = ssl.create_default_context(cadata=env.ca)
    auth = "Basic " + base64.b64encode(f":{env.key}".encode()).decode()
    route = {"type": "http", "service": "slow-web", "domain": domain, "drain_backends": True}
    req = urllib.request.Request(
        f"https://controller.{env.domain}/apps/slow/routes", data=json.dumps(route).encode(),
        headers={"Authorization": auth, "Content-Type": "application/json"}, method="POST",
    )  # fmt: skip
    with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
        assert json.loads(resp.read())["drain_backends"] is True
    wait_for(lambda: env.http(domain, "/") == (200, "ok\n"), 60, "the slow app answers")

    answer: dict[str, Any] = {}

    def slow() -> None:
        start = time.monotonic()
        answer["reply"] = env.http(domain, "/cgi-bin/slow")
        answer["took"] = time.monotonic() - start

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(1)  # the request is at the backend, which answers 2 s from now
    scaled = time.monotonic()
    env.ok("-a", "slow", "scale", "web=0")
    t.join(30)
    status, body = answer["reply"]
    assert status == 200 and "slow done" in body, answer  # (a chunked body)
    print(f"\nthe request in flight finished {answer['took']:.1f} s after it started; "
          f"scale web=0 took {time.monotonic() - scaled:.1f} s")  # fmt: skip
    env.ok("-a", "slow", "delete", "-y")
