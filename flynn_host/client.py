"""A small synchronous client of the host API, for the `flynn-host` command and tests.

Errors come back as `HostAPIError` carrying Flynn's error JSON, so callers can print the
server's own message.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

DEFAULT_ADDR = "127.0.0.1:1113"
DEFAULT_CONFIG_FILE = "/etc/flynn/host.json"
# the environment variable that carries the cluster's host key to system jobs and commands
HOST_KEY_ENV = "FLYNN_HOST_KEY"


class HostAPIError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.code = body.get("code", "unknown_error")
        self.body = body
        super().__init__(body.get("message") or f"HTTP {status}")


def host_url(addr: str | None = None) -> str:
    """`addr` (or FLYNN_HOST_ADDR) as `ip`, `ip:port` or a URL; port defaults to 1113."""
    addr = addr or os.environ.get("FLYNN_HOST_ADDR") or DEFAULT_ADDR
    if addr.startswith(("http://", "https://")):
        return addr.rstrip("/")
    if ":" not in addr:
        addr = f"{addr}:1113"
    return f"http://{addr}"


def job_host_url() -> str:
    """The host API as a platform component's host-network job reaches it: Flynn's components
    use `http://$EXTERNAL_IP:1113`."""
    return host_url(os.environ.get("EXTERNAL_IP") or "127.0.0.1")


def local_host_key() -> str | None:
    """The cluster's host key as a command on a host finds it: `$FLYNN_HOST_KEY` (what system
    jobs get), else `host_key` in the host config file (`$FLYNN_HOST_CONFIG`, default
    /etc/flynn/host.json, root-only), else None."""
    key = os.environ.get(HOST_KEY_ENV)
    if key:
        return key
    path = os.environ.get("FLYNN_HOST_CONFIG") or DEFAULT_CONFIG_FILE
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    key = data.get("host_key") if isinstance(data, dict) else None
    return key if isinstance(key, str) and key else None


def auth_headers(key: str | None) -> dict[str, str]:
    """The `Authorization` header that carries the cluster's host key (HTTP Basic, empty user,
    the key as password, as Flynn's clients send the controller key)."""
    if not key:
        return {}
    token = base64.b64encode(f":{key}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


class HostClient:
    """`key` is the cluster's host key; None: the one `local_host_key` finds."""

    def __init__(
        self, addr: str | None = None, timeout: float = 30.0, key: str | None = None
    ) -> None:
        self.url = host_url(addr)
        self.timeout = timeout
        self.key = key if key is not None else local_host_key()
        self.headers = auth_headers(self.key)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers=dict(self.headers))  # fmt: skip
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                err = json.loads(raw)
            except json.JSONDecodeError:
                err = {"message": raw.decode(errors="replace") or str(exc)}
            raise HostAPIError(exc.code, err) from None
        except urllib.error.URLError as exc:
            raise ConnectionError(f"cannot reach flynn-host at {self.url}: {exc.reason}") from None
        return json.loads(raw) if raw.strip() else None

    def status(self) -> dict[str, Any]:
        return self.request("GET", "/host/status")

    def list_jobs(self, active: bool = False) -> dict[str, Any]:
        return self.request("GET", "/host/jobs" + ("?active=true" if active else ""))

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/host/jobs/{job_id}")

    def add_job(self, job: dict[str, Any]) -> None:
        self.request("PUT", f"/host/jobs/{job['id']}", job)

    def stop_job(self, job_id: str) -> None:
        self.request("DELETE", f"/host/jobs/{job_id}")

    def signal_job(self, job_id: str, sig: int | str) -> None:
        self.request("PUT", f"/host/jobs/{job_id}/signal/{sig}")

    def plugins(self) -> list[dict[str, Any]]:
        return self.request("GET", "/plugins")

    def stream_events(self, job_id: str | None = None) -> Iterator[dict[str, Any]]:
        """Flynn's SSE job events, for all jobs or one."""
        path = f"/host/jobs/{job_id}" if job_id else "/host/jobs"
        headers = {**self.headers, "Accept": "text/event-stream"}
        req = urllib.request.Request(self.url + path, headers=headers)
        with urllib.request.urlopen(req, timeout=None) as resp:
            for raw in resp:
                line = raw.decode().rstrip("\n")
                if line.startswith("data: "):
                    yield json.loads(line[6:])
