"""Flynn's `wait` bootstrap action: wait until a service answers.

`{"url": "http://postgres-api.discoverd/ping", "status": 200, "host": "...", "timeout": 300}`:
every half second, until `timeout` seconds (default 5 minutes) have passed, an HTTP GET of the
URL must answer `status` (default 200; `host` sets the Host header), or with a `tcp://host:port`
URL a connection must be accepted. A host name `NAME.discoverd` or `leader.NAME.discoverd` is
looked up in discoverd's API (through the address each host reports in `GET /host/status`), as
a job would through discoverd's DNS: it becomes the address of an instance of service NAME (of
its leader), with the instance's own port unless the URL names one. The step fails with the
last answer or error seen.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from flynn_host.bootstrap.runner import Action, State, StepError

INTERVAL = 0.5
DEFAULT_TIMEOUT = 300.0
REQUEST_TIMEOUT = 5.0
DISCOVERD_SUFFIX = ".discoverd"


class NotYet(Exception):
    """The service does not answer as wanted yet; the message says what it did."""


def discoverd_urls(state: State) -> list[str]:
    """The discoverd API of each host that reports one."""
    urls = []
    for host in state.hosts:
        try:
            url = (host.client.status().get("discoverd") or {}).get("url")
        except Exception:  # noqa: BLE001 - a host that does not answer is skipped
            continue
        if url:
            urls.append(str(url).rstrip("/"))
    return urls


def lookup(state: State, name: str) -> list[str]:
    """`ip:port` of the instances (or the leader) that `NAME.discoverd` names."""
    service = name.removesuffix(DISCOVERD_SUFFIX)
    leader = service.startswith("leader.")
    service = service.removeprefix("leader.")
    path = f"/services/{urllib.parse.quote(service)}/" + ("leader" if leader else "instances")
    errors = []
    for base in discoverd_urls(state):
        try:
            with urllib.request.urlopen(base + path, timeout=REQUEST_TIMEOUT) as resp:
                found = json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                what = f"leader of service {service}" if leader else f"service {service}"
                raise NotYet(f"discoverd has no {what}") from None
            errors.append(f"{base}: HTTP {exc.code}")
            continue
        except (OSError, ValueError) as exc:
            errors.append(f"{base}: {exc}")
            continue
        instances = [found] if leader else found or []
        addrs = [i["addr"] for i in instances if isinstance(i, dict) and i.get("addr")]
        if not addrs:
            raise NotYet(f"discoverd has no instance of {service}")
        return addrs
    raise NotYet("no discoverd answers: " + ("; ".join(errors) or "no host reports one"))


class Wait(Action):
    def __init__(self, step: dict[str, Any]) -> None:
        super().__init__(step)
        self.url = step.get("url")
        if not isinstance(self.url, str) or not self.url:
            raise StepError("url must be set (http://..., https://... or tcp://host:port)")
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https", "tcp") or not parts.hostname:
            raise StepError(f"url {self.url!r}: expected http://, https:// or tcp:// and a host")
        if parts.scheme == "tcp" and not parts.port and not self._discoverd(parts.hostname):
            raise StepError(f"url {self.url!r}: a tcp URL needs a port")
        self.parts = parts
        self.status = step.get("status") or 200
        if not isinstance(self.status, int):
            raise StepError(f"status must be an HTTP status code, not {self.status!r}")
        self.host_header = step.get("host") or ""
        self.timeout = float(step.get("timeout") or DEFAULT_TIMEOUT)

    @staticmethod
    def _discoverd(hostname: str) -> bool:
        return hostname.endswith(DISCOVERD_SUFFIX)

    def targets(self, state: State) -> list[tuple[str, int]]:
        """(host, port) pairs to try for the URL's host name."""
        hostname, port = self.parts.hostname or "", self.parts.port
        if not self._discoverd(hostname):
            default = 443 if self.parts.scheme == "https" else 80
            return [(hostname, port or default)]
        out = []
        for addr in lookup(state, hostname):
            ip, _, own = addr.rpartition(":")
            out.append((ip, port or int(own)))
        return out

    def check(self, host: str, port: int) -> None:
        if self.parts.scheme == "tcp":
            try:
                socket.create_connection((host, port), timeout=REQUEST_TIMEOUT).close()
            except OSError as exc:
                raise NotYet(f"{host}:{port}: {exc}") from None
            return
        conn: http.client.HTTPConnection
        if self.parts.scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=REQUEST_TIMEOUT)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT)
        path = self.parts.path or "/"
        if self.parts.query:
            path += "?" + self.parts.query
        try:
            conn.request("GET", path, headers={"Host": self.host_header or self.parts.netloc})
            resp = conn.getresponse()
            body = resp.read(300).decode(errors="replace").strip()
        except (OSError, http.client.HTTPException) as exc:
            raise NotYet(f"{host}:{port}: {exc}") from None
        finally:
            conn.close()
        if resp.status != self.status:
            raise NotYet(f"{host}:{port} answered {resp.status} (want {self.status}): {body}")

    def check_any(self, targets: list[tuple[str, int]]) -> None:
        """Succeeds when one of the targets answers as wanted (as a name that resolves to
        any of them would); else NotYet with what each did."""
        errors = []
        for host, port in targets:
            try:
                self.check(host, port)
                return
            except NotYet as exc:
                errors.append(str(exc))
        raise NotYet("; ".join(errors) or "nothing to try")

    def probe(self, state: State) -> None:
        """One try: NotYet unless the URL answers as wanted now."""
        self.check_any(self.targets(state))

    def run(self, state: State) -> Any:
        deadline = time.monotonic() + self.timeout
        next_report = time.monotonic() + 10
        while True:
            try:
                self.probe(state)
                return None
            except NotYet as exc:
                last = str(exc)
            if time.monotonic() > deadline:
                raise StepError(f"timed out after {self.timeout:g}s waiting for {self.url}: {last}")
            if time.monotonic() > next_report:
                state.progress(f"waiting for {self.url}: {last}")
                next_report = time.monotonic() + 10
            time.sleep(INTERVAL)


class HostDiscoverd:
    """A status check of the discoverd API each host reports (all of them must answer 200)."""

    def __init__(self, path: str) -> None:
        self.path = "/" + path.lstrip("/")

    def probe(self, state: State) -> None:
        urls = discoverd_urls(state)
        if len(urls) < len(state.hosts):
            raise NotYet(f"{len(state.hosts) - len(urls)} host(s) report no discoverd")
        for base in urls:
            try:
                with urllib.request.urlopen(base + self.path, timeout=REQUEST_TIMEOUT):
                    pass
            except (OSError, ValueError) as exc:  # HTTPError is an OSError
                raise NotYet(f"{base}{self.path}: {exc}") from None


class StatusCheck(Action):
    """Flynn's `status-check`: the last step, every platform service healthy at once.

    `{"checks": {NAME: URL or {"url", "status", "host"} or {"host_discoverd": PATH}},
    "timeout": 60}`: each check is a `wait` (same URLs, discoverd names and defaults), or with
    `host_discoverd` a GET of PATH on the discoverd API every host reports (discoverd is not
    a service in itself); all of them are polled together,
    every half second, until every one answers as wanted in the same round or `timeout`
    seconds (default 1 minute, as Flynn's) have passed. A failure names each service that was
    not healthy and what it answered, so the operator knows where to look.
    """

    def __init__(self, step: dict[str, Any]) -> None:
        super().__init__(step)
        checks = step.get("checks")
        if not isinstance(checks, dict) or not checks:
            raise StepError("checks must map service names to URLs")
        self.checks: dict[str, Wait | HostDiscoverd] = {}
        for name, spec in checks.items():
            spec = {"url": spec} if isinstance(spec, str) else spec
            if not isinstance(spec, dict):
                raise StepError(f"check {name!r}: expected a URL or an object with a url")
            if "host_discoverd" in spec:
                self.checks[name] = HostDiscoverd(str(spec["host_discoverd"]))
                continue
            try:
                self.checks[name] = Wait({"id": f"{self.id}/{name}", **spec})
            except StepError as exc:
                raise StepError(f"check {name!r}: {exc}") from None
        self.timeout = float(step.get("timeout") or 60)

    def failing(self, state: State) -> dict[str, str]:
        """Each check that does not answer as wanted right now, with what it did."""
        out = {}
        for name, check in self.checks.items():
            try:
                check.probe(state)
            except NotYet as exc:
                out[name] = str(exc)
        return out

    def run(self, state: State) -> Any:
        deadline = time.monotonic() + self.timeout
        next_report = time.monotonic() + 10
        while True:
            failing = self.failing(state)
            if not failing:
                state.progress(f"{len(self.checks)} services healthy: {', '.join(self.checks)}")
                return {"healthy": sorted(self.checks)}
            if time.monotonic() > deadline:
                detail = "; ".join(f"{name}: {why}" for name, why in failing.items())
                raise StepError(f"unhealthy after {self.timeout:g}s: {detail}")
            if time.monotonic() > next_report:
                state.progress(f"waiting for {', '.join(failing)}")
                next_report = time.monotonic() + 10
            time.sleep(INTERVAL)
